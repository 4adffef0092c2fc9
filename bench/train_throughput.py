"""Training throughput: Stepwise's training step against Hugging Face Trainer, same model, data, machine.

Both start from the same tiny Llama weights and the same tokenized examples (prompt tokens masked) and
each trains one epoch, cut into alternating rounds with a few warm-up steps before each. Stepwise is
timed on its optimizer steps (train_step: length-grouped batches, forward, backward, clip, AdamW);
Hugging Face Trainer runs twice: length-grouped (train_sampling_strategy="group_by_length", what a
competent user sets) and with its defaults (random batches), both with dynamic padding through
DataCollatorForSeq2Seq, timed between its step-end callbacks. No logging, evaluation or checkpoint
is timed on either side. Printed: non-padding and supervised tokens/s of each, the ratio, and MFU
against a matmul peak measured in this run.

    .venv/bin/python bench/train_throughput.py [--dataset FILE] [--context_length 512] [--mini_batch_size 8]
                                              [--rounds 2] [--warmup 3]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.cli.options import parse_config  # noqa: E402
from trainer.training.batching import micro_batches  # noqa: E402
from trainer.training.loop import train_step  # noqa: E402
from trainer.training.setup import setup  # noqa: E402

SHARED_ALPACA = ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_en_demo.json"


def matmul_peak(n: int = 1024, repeats: int = 20) -> float:
    """FLOP/s of a square fp32 matmul on this machine, now (the MFU denominator)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def flops_per_token(model, context: int) -> float:
    """6N for the weights plus the attention scores, forward and backward (PaLM appendix B)."""
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    return 6 * n_params + 12 * cfg.num_hidden_layers * cfg.hidden_size * context


def bench_stepwise(run, batches: list[list[int]], warmup: int) -> dict:
    for b in batches[-warmup:]:
        train_step(run, [b])
    real = sup = 0
    start = time.perf_counter()
    for b in batches:
        batch = [run.train[j] for j in b]
        real += sum(len(e["input_ids"]) for e in batch)
        sup += sum(sum(1 for x in e["labels"][1:] if x != -100) for e in batch)
        train_step(run, [b])
    return {"seconds": time.perf_counter() - start, "tokens": real, "supervised": sup}


def bench_hf_trainer(model, tokenizer, examples: list[dict], mini_batch_size: int, lr: float,
                     warmup: int, steps: int, seed: int, sampling: str = "random") -> dict:
    from datasets import Dataset
    from transformers import (
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    counts: list[tuple[int, int]] = []
    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    def collate(features):
        counts.append((sum(len(f["input_ids"]) for f in features),
                       sum(sum(1 for x in f["labels"][1:] if x != -100) for f in features)))
        return pad(features)

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=mini_batch_size,
                                 max_steps=warmup + steps, learning_rate=lr, save_strategy="no", report_to=[],
                                 logging_strategy="no", disable_tqdm=True, use_cpu=True, seed=seed,
                                 train_sampling_strategy=sampling)
        trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(examples),
                          data_collator=collate, callbacks=[clock])
        trainer.train()
    measured = counts[warmup:warmup + steps]
    return {"seconds": clock.marks[-1] - clock.marks[warmup - 1], "tokens": sum(c[0] for c in measured),
            "supervised": sum(c[1] for c in measured)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=str(SHARED_ALPACA) if SHARED_ALPACA.exists() else "demo")
    parser.add_argument("--context_length", type=int, default=512)
    parser.add_argument("--mini_batch_size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternate the two this many times, each round a share of one epoch")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_config(["--dataset", args.dataset, "--context_length", str(args.context_length),
                            "--mini_batch_size", str(args.mini_batch_size), "--learning_rate", "1e-3",
                            "--output_dir", tmp, "--run_name", "bench", "--use_tensorboard", "false",
                            "--progress", "false", "--demo_records", "4000", "--eval_prompts", "none"])
        run = setup(cfg)
        run.reporter.enabled = False
        initial = copy.deepcopy(run.raw_model)  # the peer starts from the very same weights
        peak = matmul_peak()
        # One epoch each, cut into alternating rounds: both sides see the whole data set once (the
        # same examples, in their own order), and a neighbour's burst of work on this shared machine
        # slows a round of each side rather than all of one side.
        lengths = [len(e["input_ids"]) for e in run.train]
        epoch = micro_batches(lengths, args.mini_batch_size, cfg.optim.seed, 0)
        share = -(-len(epoch) // args.rounds)
        # The peer as a competent user runs it (length-grouped batches), and with its defaults.
        sides: dict[str, list[dict]] = {"stepwise": [], "hf-trainer-grouped": [], "hf-trainer-default": []}
        for r in range(args.rounds):
            part = epoch[r * share:(r + 1) * share]
            sides["stepwise"].append(bench_stepwise(run, part, args.warmup))
            for name, sampling in (("hf-trainer-grouped", "group_by_length"), ("hf-trainer-default", "random")):
                sides[name].append(bench_hf_trainer(copy.deepcopy(initial), run.tokenizer, run.train,
                                                    args.mini_batch_size, 1e-3, args.warmup, len(part), seed=r,
                                                    sampling=sampling))
        totals = {name: {k: sum(r[k] for r in side) for k in side[0]} for name, side in sides.items()}
        steps = len(epoch)
    fpt = flops_per_token(run.raw_model, args.context_length // 2)
    print(f"data {args.dataset}: {len(run.train)} examples, context {args.context_length}, "
          f"mini batch {args.mini_batch_size}, {steps} timed steps each (one epoch, {args.rounds} alternating rounds, "
          f"{args.warmup} warm-up steps before each), "
          f"{torch.get_num_threads()} threads")
    print(f"matmul peak {peak / 1e9:.1f} GFLOP/s (fp32, measured now)")
    rates = {}
    for name, r in totals.items():
        tps, sps = r["tokens"] / r["seconds"], r["supervised"] / r["seconds"]
        rates[name] = sps
        print(f"{name:<19} {tps:>9,.0f} non-padding tok/s  {sps:>9,.0f} supervised tok/s  "
              f"MFU {tps * fpt / peak:.1%}")
    for name in ("hf-trainer-grouped", "hf-trainer-default"):
        print(f"ratio stepwise / {name} (supervised tok/s): {rates['stepwise'] / rates[name]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
