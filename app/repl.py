"""`python -m app.repl`: checkpoints side by side in the terminal, and held-out spot checks.

    python -m app.repl [CKPT ...] [--root checkpoints] [--prompt TEXT | --spot-check N] [--prompts FILE]
                       [--plain] [--max_new_tokens N] [--temperature T] [--top_p P] [--top_k K]
                       [--repetition_penalty R] [--seed S]

CKPT is a checkpoint folder (`checkpoints/run/step-000500`, `.../final`), a run folder (its spread is
used, as below), or either of those relative to --root. With no CKPT: the newest run under --root,
at most 4 panels spread across it: final/ plus the first, the last and evenly spaced periodic
checkpoints in between (a step folder that final/ is a copy of is left out: it would answer the same).

Typing a line sends it to every panel; each panel keeps its own multi-turn history, formatted with
its checkpoint's own chat template. Commands (Tab completes, Up recalls; the loop is app/repl_loop.py,
the commands that score or save answers are here):

    /models  /load CKPT|N  /drop N  /params [key=value ...]  /heldout [N]  /score [KEY | ID [k=v ...]]
    /history [on|off]  /blind [on|off]  /vote A|B|tie|bad [A C]  /reset  /save FILE(.md|.json)  /help  /quit

`/history on` shows each panel's whole conversation instead of its latest answer. `/blind` shuffles
the panels and titles them A, B, C, D until a vote; `/vote A` (B, tie, bad; `/vote A C` for A better
than C when more than two panels are loaded) appends a vote to `<root>/votes.jsonl`, the web app's
file, marked blind when the titles were hidden, and reveals them; a vote names checkpoints relative to
the root and holds nothing about who voted. Ctrl-C stops an answer (every panel
keeps what it said), ends a command that is working, and is ignored at the prompt: only /quit (or
/exit) and Ctrl-D leave.

--max_new_tokens N caps max new tokens per answer as the web app's flag does (default 512): answers
start at N when it is given, else at 128, and `/params max_new_tokens=` above the cap is held to it.

`--prompt TEXT` answers once in every panel and exits (1 when a panel failed). `--spot-check N`
generates answers to N held-out prompts (a sample seeded by --seed, default 0, so reruns agree) with
every checkpoint, scores them, prints one row per checkpoint and exits 0.

Output is rich panels and tables when stdout is a terminal, else plain (or with --plain). The plain
spot-check output is tab-separated: a header line, then one line per checkpoint in panel order:

    checkpoint  step  val_loss  n  if_prompt_strict  if_prompt_loose  if_inst_strict  if_inst_loose
    rougeL  task_accuracy  mean_length  distinct_2  eos_rate  path

`checkpoint` is `run/folder`; fractions are in [0, 1] with 4 decimals; `nan` where a value does not
apply (no IFEval instructions among the prompts, no references, no val loss). Progress goes to stderr.
Mistakes (bad arguments, no checkpoints, a folder that does not load) are one line on stderr, exit 2;
inside the REPL they are one line and the REPL goes on.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shlex
import sys
import time
from pathlib import Path

from prompt_toolkit.completion import Completer, Completion

from app.catalog import checkpoint_id, fmt
from app.chatio import ChatIO, PlainChatIO, RichChatIO, StopFlag
from app.repl_loop import MAX_NEW_TOKENS, ChatLoop, letter, resolve, run_selection
from app.session import CompareSession, ModelCache
from trainer.cli.args import ArgumentParser, run_command
from trainer.core.catalog import checkpoint_label, newest_run
from trainer.core.errors import StepwiseError
from trainer.core.resources import user_or_packaged
from trainer.evals import registry, scoring
from trainer.evals.heldout import heldout_samples, score_generation, summarize_rows
from trainer.evals.prompts import HeldoutPrompt, check_instruction, load_prompts
from trainer.inference.generate import GenerationSettings

DEFAULT_PROMPTS = "eval_prompts/demo_ifeval.jsonl"  # from the working folder, else the packaged copy
METRICS = (*scoring.SUMMARY_METRICS, "mean_length", "distinct_2", "eos_rate")
SPOT_HEADER = ("checkpoint", "step", "val_loss", "n", *METRICS, "path")


# --- which checkpoints ---------------------------------------------------------------------------

def pick_checkpoints(args: list[str], root: Path) -> list[Path]:
    if not args:
        return run_selection(newest_run(root))
    return [p for a in args for p in resolve(a, root)]


# --- scoring and saving answers in the REPL ------------------------------------------------------

def marks(flags: list[bool]) -> str:
    return "".join("✓" if f else "✗" for f in flags)


def check_lines(p: HeldoutPrompt, result: dict) -> str:
    lines = [f"{'✓' if s else '✗'} {i}" + ("" if s == lo else " (loose ✓)")
             for i, s, lo in zip(p.instruction_id_list, result["strict"], result["loose"])]
    if result["rougeL"] is not None:
        lines.append(f"rougeL {result['rougeL']:.3f}")
    if result.get("correct") is not None:
        lines.append(f"{'✓' if result['correct'] else '✗'} answer: {p.answer}")
    return "\n".join(lines)


def summary_row(name: str, s: dict) -> list[str]:
    return [name, str(s["n"])] + [fmt(s[m], 3) for m in METRICS]


class Repl(ChatLoop):
    """The REPL: the chat loop (app/repl_loop.py) and the commands that score its answers on held-out
    checks (/heldout, /score) or write them out (/save)."""

    def command_table(self) -> dict:
        """The loop's commands, with /heldout and /score after /params and /save before /help."""
        base = list(super().command_table().items())
        names = [name for name, _ in base]
        checks = [("/heldout", (self.cmd_heldout, "[N]", "N random held-out prompts (default 3), checked and scored")),
                  ("/score", (self.cmd_score, "[KEY | ID [k=v ...]]",
                              "check the last answers (default: against the held-out prompt just typed)"))]
        save = [("/save", (self.cmd_save, "FILE", "write the transcript (.json as JSON, anything else Markdown)"))]
        at, end = names.index("/params") + 1, names.index("/help")
        return dict(base[:at] + checks + base[at:end] + save + base[end:])

    def cmd_heldout(self, arg: str) -> None:
        if arg and (not arg.isdigit() or int(arg) < 1):
            raise StepwiseError(f"/heldout N: N is a positive number, got {arg!r}")
        pool = self.prompts()
        chosen = self.rng.sample(pool, min(int(arg or 3), len(pool)))
        # A scratch session: each held-out prompt is answered on its own, and the chat's histories stay.
        scratch = CompareSession([s.path for s in self.session.sides], cache=self.session.cache,
                                 settings=self.session.settings)
        results = [[] for _ in scratch.sides]
        stop = StopFlag()
        with self.ctrl_c.answering(stop):  # Ctrl-C anywhere in the run ends it; what was answered is scored
            for k, p in enumerate(chosen, 1):
                self.io.message(f"held-out {k}/{len(chosen)} [{p.key}] {p.prompt}")
                scratch.reset()

                def extra(i, gen, p=p):
                    row = score_generation(p, gen)
                    results[i].append(row)
                    return check_lines(p, row)

                self.stream(scratch, p.prompt, extra, stop)
                if stop.is_set():
                    self.io.message(f"stopped after {k} of {len(chosen)} prompts")
                    break
        rows = [summary_row(self.name(i, s), summarize_rows(r))
                for i, (s, r) in enumerate(zip(scratch.sides, results)) if r]
        self.io.table(f"held-out scores ({k} prompt(s) from {self.prompts_path})",
                      ["checkpoint", "n", *METRICS], rows)

    def score_target(self, arg: str) -> HeldoutPrompt:
        words = shlex.split(arg)
        if not words:
            match = [p for p in self.prompts() if p.prompt.strip() == (self.last_prompt or "").strip()]
            if not match:
                raise StepwiseError("/score: the last prompt is not a held-out prompt; give /score KEY or "
                                    "/score INSTRUCTION_ID [key=value ...]")
            return match[0]
        if ":" not in words[0]:
            match = [p for p in self.prompts() if p.key == words[0]]
            if not match:
                raise StepwiseError(f"/score {words[0]}: no such key in {self.prompts_path}")
            return match[0]
        ids, kwargs = [], []
        for w in words:
            if "=" in w and ids:
                k, _, v = w.partition("=")
                kwargs[-1][k] = int(v) if v.lstrip("-").isdigit() else v
            elif w in registry.instruction_registry():
                ids.append(w)
                kwargs.append({})
            else:
                raise StepwiseError(f"/score: {w!r} is not an IFEval instruction id (or key=value after one)")
        p = HeldoutPrompt("typed", self.last_prompt or "", ids, kwargs)
        for i, kw in zip(ids, kwargs):
            check_instruction(i, kw, p.prompt, "/score")
        return p

    def cmd_score(self, arg: str) -> None:
        answered = [s for s in self.session.sides if s.last is not None]
        if not answered:
            raise StepwiseError("/score: no answers yet; type a prompt first")
        p = self.score_target(arg)
        rows = []
        for i, s in enumerate(self.session.sides):
            if s.last is None:
                rows.append([self.name(i, s), "-", "-", "-", "-"])
                continue
            r = scoring.score_response(p, s.last.text)
            rows.append([self.name(i, s), marks(r["strict"]) or "-", marks(r["loose"]) or "-",
                         fmt(r["rougeL"], 3), str(r["length"])])
        self.io.table(f"/score against {p.key}: {', '.join(p.instruction_id_list) or 'reference only'}",
                      ["checkpoint", "strict", "loose", "rougeL", "words"], rows)

    def cmd_save(self, arg: str) -> None:
        if not arg:
            raise StepwiseError("usage: /save FILE (.json for JSON, anything else Markdown)")
        path = Path(arg).expanduser()
        panels = [{"checkpoint": str(s.path), "label": self.title(s), "history": list(s.history)}
                  for s in self.session.sides]
        settings = dataclasses.asdict(self.session.settings)
        if path.suffix.lower() == ".json":
            text = json.dumps({"settings": settings, "panels": panels}, indent=2, ensure_ascii=False) + "\n"
        else:
            text = transcript_markdown(panels, settings)
        try:
            path.write_text(text, encoding="utf-8")
        except OSError as err:
            raise StepwiseError(f"/save {arg}: {err.strerror}") from None
        self.io.message(f"saved {len(panels)} panel(s) to {path}")


def transcript_markdown(panels: list[dict], settings: dict) -> str:
    out = ["# Stepwise transcript", "", "Settings: " + ", ".join(f"`{k}={v}`" for k, v in settings.items()), ""]
    for i, p in enumerate(panels, 1):
        out += [f"## [{i}] {p['label']}", "", f"`{p['checkpoint']}`", ""]
        for m in p["history"]:
            out += [f"**{m['role']}:**", "", m["content"], ""]
    return "\n".join(out)


class CommandCompleter(Completer):
    """Tab completion: command names, then each command's own words (checkpoints, keys, setting names)."""

    def __init__(self, repl: ChatLoop):
        self.repl = repl

    def get_completions(self, document, complete_event):
        text = document.text_before_cursor
        if not text.startswith("/"):
            return
        if " " not in text:
            word, options = text, [*self.repl.commands, "/exit"]
        else:
            name, _, rest = text.partition(" ")
            word, options = rest.split(" ")[-1], self.options(name)
        for o in options:
            if o.lower().startswith(word.lower()):  # /vote a completes to A
                yield Completion(o, start_position=-len(word))

    def options(self, name: str) -> list[str]:
        repl = self.repl
        try:
            if name == "/load":
                return [checkpoint_id(c.path) for c in repl.catalogue()]
            if name == "/drop":
                return [str(i) for i in range(1, len(repl.session.sides) + 1)]
            if name == "/params":
                return [f"{f.name}=" for f in dataclasses.fields(GenerationSettings)]
            if name == "/score":
                return [p.key for p in repl.prompts()] + sorted(registry.instruction_registry())
            if name in ("/blind", "/history"):
                return ["on", "off"]
            if name == "/vote":
                return [letter(i) for i in range(len(repl.session.sides))] + ["tie", "bad"]
        except StepwiseError:  # a missing prompt file just means nothing to complete
            pass
        return []


# --- without a person ----------------------------------------------------------------------------

def spot_check(paths: list[Path], cache, settings: GenerationSettings, prompts_path: str, n: int,
               io: ChatIO) -> int:
    pool = load_prompts(prompts_path)
    chosen = random.Random(settings.seed or 0).sample(pool, min(n, len(pool)))
    plain = isinstance(io, PlainChatIO)
    rows = []
    for k, path in enumerate(paths, 1):
        t0 = time.perf_counter()
        loaded = cache.get(path)
        _, s = heldout_samples(loaded.model, loaded.tokenizer, chosen, settings)
        info = loaded.info
        if plain:
            rows.append([checkpoint_id(path), fmt(info.step if info else None),
                         fmt(info.val_loss if info else None), str(s["n"])] + [fmt(s[m]) for m in METRICS]
                        + [str(path)])
        else:  # a terminal is read by eye: the panel titles, 3 digits, no paths
            rows.append(summary_row(checkpoint_label(path), s))
        print(f"spot-check {k}/{len(paths)} {checkpoint_id(path)}: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    if plain:
        io.table(None, SPOT_HEADER, rows)
    else:
        io.table(f"spot check: {len(chosen)} prompts from {prompts_path}", ["checkpoint", "n", *METRICS], rows)
    return 0


# --- entry ---------------------------------------------------------------------------------------

def parse_args(argv):
    ap = ArgumentParser(prog="python -m app.repl", description="Compare checkpoints side by side in the terminal.")
    ap.add_argument("ckpts", nargs="*", metavar="CKPT", help="checkpoint or run folders (default: newest run)")
    ap.add_argument("--root", default="checkpoints", help="where runs live (default: checkpoints)")
    ap.add_argument("--prompt", help="answer this once in every panel and exit")
    ap.add_argument("--spot-check", "--spot_check", type=int, metavar="N", dest="spot_check",
                    help="score N held-out prompts per checkpoint, print a table, exit")
    ap.add_argument("--prompts", default=DEFAULT_PROMPTS, help=f"held-out prompt file (default {DEFAULT_PROMPTS})")
    ap.add_argument("--plain", action="store_true", help="plain output even on a terminal")
    ap.add_argument("--max_new_tokens", type=int, metavar="N",
                    help=f"cap on max new tokens per answer, as in the web app (default {MAX_NEW_TOKENS}); "
                         f"answers start at N, or at {GenerationSettings.max_new_tokens} without it")
    defaults = GenerationSettings()
    for f in dataclasses.fields(GenerationSettings):
        if f.name == "max_new_tokens":
            continue
        kind = int if str(f.type).startswith("int") else float
        ap.add_argument(f"--{f.name}", type=kind, default=getattr(defaults, f.name), help=f"generation: {f.name}")
    args = ap.parse_args(argv)
    args.prompts = str(user_or_packaged(args.prompts))  # eval_prompts/... works from any folder
    if args.spot_check is not None and args.spot_check < 1:
        ap.error(f"--spot-check N must be at least 1, got {args.spot_check}")
    if args.prompt is not None and args.spot_check is not None:
        ap.error("--prompt and --spot-check do not go together")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_command(command, sys.argv[1:] if argv is None else argv)


def command(argv: list[str]) -> int:
    args = parse_args(argv)
    root = Path(args.root)
    cap = MAX_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens
    start = min(GenerationSettings.max_new_tokens, cap) if args.max_new_tokens is None else cap
    settings = GenerationSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(GenerationSettings)
                                     if f.name != "max_new_tokens"}, max_new_tokens=start)
    paths = pick_checkpoints(args.ckpts, root)
    plain = args.plain or not sys.stdout.isatty()
    if args.spot_check is not None:
        load_prompts(args.prompts)  # a bad prompt file fails before any model loads
        io = PlainChatIO() if plain else RichChatIO()
        return spot_check(paths, ModelCache(), settings, args.prompts, args.spot_check, io)
    # No root for the session: its confinement is for the web app; here any folder may be compared.
    session = CompareSession([str(p) for p in paths], settings=settings)
    repl = Repl(session, PlainChatIO() if plain else RichChatIO(), root, args.prompts, max_new_tokens=cap)
    if not plain and args.prompt is None:
        repl.io = RichChatIO(completer=CommandCompleter(repl))
        print(f"loading {len(paths)} checkpoint(s)…", file=sys.stderr, flush=True)
    for side in session.sides:
        repl.load(side.path)  # every model up front: a broken folder is an exit-2 line now, not a red panel
    if args.prompt is not None:
        repl.ask(args.prompt)
        return 1 if any(s.error for s in session.sides) else 0
    return repl.run()


if __name__ == "__main__":
    sys.exit(main())
