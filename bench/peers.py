"""One side of bench/train_throughput.py, one round, in its own process: the parent writes a plan (model
folder, tokenised examples, the batches) and runs `python bench/peers.py PLAN NAME ROUND` once per side
and round; the last stdout line is `RESULT {json}` with the timed seconds, tokens, losses and this
process's peak RSS (read after its timed steps, so no other side's memory is in it).

Sides: `stepwise` (trainer.training.loop.train_step on a Run from trainer.training.setup.setup),
`hf-trainer-grouped` and `hf-trainer-default` (transformers.Trainer), `trl-sft-grouped` and
`trl-sft-padding-free` (trl.SFTTrainer, padded or flattened). Every side runs the plan's warm-up batches
first, then its round's timed batches.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIDES = ("stepwise", "hf-trainer-grouped", "hf-trainer-default", "trl-sft-grouped", "trl-sft-padding-free")
"""The sides a plain run measures."""
VARIANTS = {"stepwise-compile": ["--compile"], "stepwise-packing": ["--packing", "true"],
            "stepwise-compile-plain": ["--compile"]}
"""Further sides, on request (--sides): Stepwise's step with these `trainer train` flags added."""
VARIANT_ENV = {"stepwise-compile-plain": {"STEPWISE_PLAIN_LAYERS": "1"}}
"""Environment of a variant's process (the model's own forwards: what the fused layers change)."""
PEER_VARIANTS = {"hf-trainer-grouped-compile": {"torch_compile": True}}
"""Further peer sides, on request: hf-trainer-grouped with these TrainingArguments added."""
ON_REQUEST = (*VARIANTS, *PEER_VARIANTS)


def peak_rss_mb() -> float:
    """This process's resident-set high-water mark (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mb() -> float | None:
    """The GPU memory this process's tensors took at most (PyTorch's allocator), or None without a GPU."""
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def sync() -> None:
    """Wait for the GPU's queued work (a no-op on the CPU), so that a clock read after it counts it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def counts(examples: list[dict], batch: list[int]) -> tuple[int, int]:
    """(non-padding tokens, supervised tokens) of a batch; a label is learned from when it is not -100
    and not the first of its row (nothing predicts it)."""
    return (sum(len(examples[i]["input_ids"]) for i in batch),
            sum(sum(1 for x in examples[i]["labels"][1:] if x != -100) for i in batch))


def summary(examples: list[dict], timed: list[list[int]], losses: list[float], seconds: float,
            first_loss: float) -> dict:
    """What a side reports: timed seconds, token counts, the token-weighted loss sum, peak RSS."""
    tokens = supervised = 0
    loss_sum = 0.0
    for batch, loss in zip(timed, losses):
        real, sup = counts(examples, batch)
        tokens, supervised, loss_sum = tokens + real, supervised + sup, loss_sum + loss * sup
    return {"seconds": seconds, "tokens": tokens, "supervised": supervised, "loss_sum": loss_sum,
            "first_loss": first_loss, "steps": len(timed), "rss_mb": peak_rss_mb(), "gpu_mb": peak_gpu_mb()}


def run_stepwise(plan: dict, examples: list[dict], warmup: list[list[int]], timed: list[list[int]],
                 extra: list[str] = ()) -> dict:
    """Main's own step, as `python -m trainer train` runs it (with `extra` flags): setup(cfg), then
    train_step per batch."""
    from trainer.cli.options import parse_config
    from trainer.training.loop import train_step
    from trainer.training.progress import Reporter
    from trainer.training.setup import setup

    with tempfile.TemporaryDirectory() as tmp:
        steps = len(warmup) + len(timed)
        cfg = parse_config(plan["stepwise_args"] + list(extra) + ["--output_dir", tmp, "--max_steps", str(steps)])
        run = setup(cfg, Reporter(enabled=False, progress=False))
        if [(e["input_ids"], e["labels"]) for e in run.train] != [(e["input_ids"], e["labels"]) for e in examples]:
            raise SystemExit("stepwise: setup() tokenised the data differently from the plan's examples")
        first = train_step(run, [warmup[0]])[0]
        for batch in warmup[1:]:
            train_step(run, [batch])
        losses = []
        sync()
        start = time.perf_counter()
        for batch in timed:
            losses.append(train_step(run, [batch])[0])
        sync()
        seconds = time.perf_counter() - start
    return summary(examples, timed, losses, seconds, first)


def trainer_class(base, order: list[int]):
    """`base` (Trainer or SFTTrainer) drawing examples in `order`, recording each step's loss and the
    time at each step's end (a callback, as a user's would be; nothing is logged or saved)."""
    from torch.utils.data import Sampler
    from transformers import TrainerCallback

    class Fixed(Sampler):
        def __iter__(self):
            return iter(order)

        def __len__(self):
            return len(order)

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.marks.append(time.perf_counter())

    class Timed(base):
        def __init__(self, *args, **kwargs):
            self.clock, self.losses = Clock(), []
            super().__init__(*args, callbacks=[self.clock], **kwargs)

        def _get_train_sampler(self, train_dataset=None):
            return Fixed()

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            self.losses.append(float(loss))
            return loss

    return Timed


def common_args(plan: dict, steps: int) -> dict:
    """TrainingArguments shared by the Hugging Face sides: Stepwise's optimizer settings (fused AdamW,
    beta2 0.95, no decay, clipping at 1, a constant learning rate), fp32 or bf16 autocast (Trainer's bf16=True
    on CPU is torch.autocast("cpu", bfloat16), as Stepwise's --dtype bf16), nothing logged or saved."""
    return dict(per_device_train_batch_size=plan["mini_batch_size"], max_steps=steps, learning_rate=plan["lr"],
                lr_scheduler_type="constant", adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0,
                optim="adamw_torch_fused", save_strategy="no", report_to=[], logging_strategy="no",
                disable_tqdm=True, use_cpu=plan.get("device", "cpu") == "cpu", seed=plan["seed"], dataloader_num_workers=0,
                bf16=plan["dtype"] == "bf16")


def run_hf(plan: dict, examples: list[dict], warmup: list[list[int]], timed: list[list[int]], name: str) -> dict:
    """transformers.Trainer with dynamic padding (DataCollatorForSeq2Seq), or TRL's SFTTrainer (its own collator)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(plan["model_dir"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(plan["model_dir"])
    order = [i for batch in warmup + timed for i in batch]
    steps = len(warmup) + len(timed)
    with tempfile.TemporaryDirectory() as tmp:
        if name.startswith("trl-sft"):
            from datasets import Dataset
            from trl import SFTConfig, SFTTrainer

            # Pre-tokenised input_ids + labels (-100 on the prompt): TRL keeps a given labels column as is,
            # which is its completion-only loss on exactly Stepwise's supervised tokens. padding_free flattens
            # each batch into one row (else its collator pads it); max_length None because the examples are
            # already cut at the context. Its default of gradient checkpointing is turned off, its bf16 default
            # replaced by the plan's dtype (common_args).
            args = SFTConfig(output_dir=tmp, padding_free=name == "trl-sft-padding-free", max_length=None,
                             packing=False, gradient_checkpointing=False, **common_args(plan, steps))
            trainer = trainer_class(SFTTrainer, order)(model=model, args=args, train_dataset=Dataset.from_list(examples),
                                                       processing_class=tokenizer)
        else:
            from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

            args = TrainingArguments(output_dir=tmp, **common_args(plan, steps), **PEER_VARIANTS.get(name, {}))
            collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
            # The examples as a plain list (a map-style dataset to Trainer), so no Arrow table sits in the way.
            trainer = trainer_class(Trainer, order)(model=model, args=args, train_dataset=examples,
                                                    data_collator=collator)
        trainer.train()
    marks, w = trainer.clock.marks, len(warmup)
    return summary(examples, timed, trainer.losses[w:], marks[-1] - marks[w - 1], trainer.losses[0])


def side_batches(plan: dict, name: str, round_: int) -> tuple[list[list[int]], list[list[int]]]:
    """(warm-up batches, timed batches) of a side in a round. Every side gets the plan's batches, except
    hf-trainer-default: every round's timed examples dealt into random batches (its default sampler's
    padding), the same number to each round, so over all rounds it trains the very same examples."""
    warmup, rounds = plan["warmup"], plan["rounds"]
    if name != "hf-trainer-default":
        return warmup, rounds[round_]
    pool = [i for part in rounds for batch in part for i in batch]
    perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(plan["seed"])).tolist()
    b = plan["mini_batch_size"]
    batches = [[pool[j] for j in perm[k:k + b]] for k in range(0, len(pool), b)]
    return warmup, batches[round_::len(rounds)]


def main(argv: list[str]) -> int:
    plan_path, name, round_ = argv[0], argv[1], int(argv[2])
    if name not in SIDES + ON_REQUEST:
        raise SystemExit(f"bench/peers.py: unknown side {name!r} (one of {', '.join(SIDES + ON_REQUEST)})")
    plan = json.loads(Path(plan_path).read_text())
    torch.set_num_threads(plan["threads"])
    examples = json.loads(Path(plan["examples"]).read_text())
    warmup, timed = side_batches(plan, name, round_)
    os.environ.update(VARIANT_ENV.get(name, {}))
    if name == "stepwise" or name in VARIANTS:
        result = run_stepwise(plan, examples, warmup, timed, VARIANTS.get(name, []))
    else:
        result = run_hf(plan, examples, warmup, timed, name)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(sys.argv[1:]))
