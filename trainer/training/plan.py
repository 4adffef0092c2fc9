"""`python -m trainer plan`: how many steps is an epoch, and how long will it take?

Takes the same config and flags as `train`. Counts come from the real split and tokenization; time
comes from the throughput an earlier run of the same config recorded, or else from a short real
timing on this machine (a few optimizer steps after a warm-up), announced before it starts since a
real model's steps can take minutes; with output not a terminal a plain line follows whenever
nothing was printed for 30 seconds. The table says where the time came from.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from dataclasses import dataclass, replace

from rich.console import Console
from rich.table import Table

from trainer.core import catalog
from trainer.core.config import Config, load_saved
from trainer.training.batching import steps_per_epoch, tokenize

# Fields that change the cost of a step; a run with the same ones has a throughput worth reusing.
SPEED_KEYS = ("pretrained_model", "dtype", "compile", "lora_r", "lora_target_modules", "gradient_checkpointing", "fsdp",
              "dataset", "context_length", "mini_batch_size", "total_batch_size", "demo_records")


@dataclass
class Plan:
    train_examples: int
    val_examples: int
    grad_accum_steps: int
    world_size: int
    mini_batch_size: int
    steps_per_epoch: int
    total_steps: int
    tokens_per_epoch: int | None = None
    truncated_share: float | None = None
    seconds_per_step: float | None = None
    timing_source: str = "not measured"

    @property
    def examples_per_step(self) -> int:
        return self.mini_batch_size * self.grad_accum_steps * self.world_size

    @property
    def epochs(self) -> float:
        return self.total_steps / self.steps_per_epoch


def count(cfg: Config, train_n: int, val_n: int) -> Plan:
    """The seed's arithmetic: accumulation, examples a step, steps an epoch, epochs at max_steps."""
    spe = steps_per_epoch(train_n, cfg.optim.mini_batch_size, cfg.grad_accum_steps * cfg.world_size)
    total = cfg.optim.max_steps or math.ceil((cfg.optim.num_epochs or 1.0) * max(spe, 1))
    return Plan(train_n, val_n, cfg.grad_accum_steps, cfg.world_size, cfg.optim.mini_batch_size, spe, total)


def recorded_speed(cfg: Config) -> tuple[float, str] | None:
    """Seconds per step recorded by the newest earlier run of the same config, if any."""
    wanted = _speed_fields(cfg)
    for run in catalog.list_runs(cfg.run.output_dir):
        saved = run.path / "config.yaml"
        seconds = run.metrics.get("data", {}).get("seconds_per_step")
        if seconds and saved.is_file() and _speed_fields(load_saved(saved)) == wanted:
            return seconds, f"recorded by run {run.name}, evaluations and checkpoints included"
    return None


def _speed_fields(cfg: Config) -> dict:
    flat = {k: v for section in cfg.to_dict().values() if isinstance(section, dict) for k, v in section.items()}
    return {k: flat.get(k) for k in SPEED_KEYS}


def model_name(cfg: Config) -> str:
    return "the demo model" if cfg.model.pretrained_model == "demo" else cfg.model.pretrained_model


def measure_speed(cfg: Config, steps: int = 3, console: Console | None = None) -> tuple[float, str]:
    """Seconds per optimizer step, timed for real after one warm-up step (model built, data loaded).
    With a console, what it is doing shows: a spinner on a terminal, else a Heartbeat's plain lines."""
    from trainer.training.batching import micro_batches
    from trainer.training.loop import train_step
    from trainer.training.progress import Heartbeat, Reporter, duration
    from trainer.training.setup import setup

    doing = {"what": "loading the data and the model"}
    with contextlib.ExitStack() as stack:
        if console is not None and console.is_terminal:
            spinner = stack.enter_context(console.status(f"timing: {doing['what']}"))
        elif console is not None:
            stack.enter_context(Heartbeat(lambda elapsed: f"timing: {doing['what']}, {duration(elapsed)} elapsed",
                                          lambda text: console.print(text, markup=False)))

        def now(what: str) -> None:
            doing["what"] = what
            if console is not None and console.is_terminal:
                spinner.update(f"timing: {what}")

        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        timing_cfg = replace(cfg, run=replace(cfg.run, output_dir=tmp, run_name="timing", resume=False,
                                              use_tensorboard=False, progress=False))
        run = setup(timing_cfg, reporter=Reporter(enabled=False))
        lengths = [len(e["input_ids"]) for e in run.train]
        batches = micro_batches(lengths, cfg.optim.mini_batch_size, cfg.optim.seed, 0)
        g = run.micro_per_step

        def step_batches(i: int) -> list:  # wraps around a data set smaller than the timing needs
            return [batches[(i * g + j) % len(batches)] for j in range(g)]

        now("warm-up step")
        train_step(run, step_batches(0))  # warm-up: allocator, kernels, lazy init
        start = time.perf_counter()
        for i in range(1, steps + 1):
            now(f"step {i}/{steps}")
            train_step(run, step_batches(i))
        return (time.perf_counter() - start) / steps, f"measured now over {steps} training steps"


def make_plan(cfg: Config, timing_steps: int = 3, console: Console | None = None) -> Plan:
    """The plan for cfg; without a recorded speed, timing_steps real steps are timed, announced on
    console first (with the flag that skips them)."""
    from trainer.training.progress import Reporter
    from trainer.training.setup import load_data, load_tokenizer_and_model

    quiet = Reporter(enabled=False)
    train_records, val_records = load_data(cfg, quiet)
    tokenizer, _ = load_tokenizer_and_model(cfg, train_records, with_model=False)
    _, stats = tokenize(tokenizer, train_records, cfg.data.context_length)
    # Tokenization may drop examples whose answer lies past the context; the loop counts what is left.
    plan = replace(count(cfg, stats.examples, len(val_records)), tokens_per_epoch=stats.tokens,
                   truncated_share=stats.truncated / max(len(train_records), 1))
    timing = recorded_speed(cfg)
    if timing is None and timing_steps:
        if console is not None:
            console.print(f"timing {timing_steps} training steps of {model_name(cfg)} (after one warm-up step); "
                          "pass --timing_steps 0 to skip", markup=False)
        timing = measure_speed(cfg, timing_steps, console)
    if timing:
        plan.seconds_per_step, plan.timing_source = timing
    return plan


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h {rest // 60:02d}m" if hours else f"{rest // 60}m {rest % 60:02d}s"


def render(plan: Plan, console: Console) -> None:
    facts = Table(show_header=False, title="plan")
    facts.add_row("train / val examples", f"{plan.train_examples:,} / {plan.val_examples:,}")
    facts.add_row("gradient accumulation", f"{plan.grad_accum_steps} step(s) x {plan.world_size} process(es)")
    facts.add_row("effective batch", f"{plan.examples_per_step:,} examples a step")
    facts.add_row("steps per epoch", f"{plan.steps_per_epoch:,}")
    facts.add_row("steps planned", f"{plan.total_steps:,} = {plan.epochs:.2f} epochs")
    if plan.tokens_per_epoch is not None:
        facts.add_row("tokens per epoch", f"{plan.tokens_per_epoch:,}")
        facts.add_row("truncated at context_length", f"{plan.truncated_share:.1%}")
    facts.add_row("time per step", f"{plan.seconds_per_step:.3f} s ({plan.timing_source})"
                  if plan.seconds_per_step else plan.timing_source)
    console.print(facts)
    table = Table(title="epochs against steps and time")
    for column in ("epochs", "steps", "est. time"):
        table.add_column(column, justify="right")
    for epochs in dict.fromkeys([round(plan.epochs, 2), 3, 4, 5]):
        now = epochs == round(plan.epochs, 2)
        steps = plan.total_steps if now else math.ceil(epochs * plan.steps_per_epoch)
        secs = steps * plan.seconds_per_step if plan.seconds_per_step else None
        table.add_row(f"{epochs:g}" + (" (now)" if now else ""), f"{steps:,}", _duration(secs))
    console.print(table)
