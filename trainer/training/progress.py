"""What the person at the terminal sees: a rich progress bar, one-line events, TensorBoard scalars.

Only rank 0 reports. Without a terminal (or with --progress false) log entries print as plain lines,
and a Heartbeat prints a plain status line whenever nothing else was printed for PROGRESS_INTERVAL_S
(a long step, an evaluation, a checkpoint), so a log file never goes quiet for minutes.

tok/s counts two things, both shown: supervised tokens (labels != -100, the tokens the loss is
taken over, `tokens_per_s`) and non-padding tokens (the attention mask's sum, prompt tokens
included, `nonpad_tokens_per_s`), the figure most trainers report.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from trainer.core.config import METRICS

PROGRESS_INTERVAL_S = 30.0
"""Longest quiet spell of a long command whose output is not a terminal; the environment variable
STEPWISE_PROGRESS_INTERVAL_S overrides it (the tests use a fraction of a second)."""


def progress_interval() -> float:
    try:
        value = float(os.environ.get("STEPWISE_PROGRESS_INTERVAL_S", PROGRESS_INTERVAL_S))
    except ValueError:
        return PROGRESS_INTERVAL_S
    return value if value > 0 else PROGRESS_INTERVAL_S


def duration(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Heartbeat:
    """While the block runs, say(status(seconds since start)) from a background thread whenever
    nothing was said for `interval` seconds; touch() after printing anything else. For output that is not a terminal,
    where a live progress bar shows nothing until it ends."""

    def __init__(self, status: Callable[[float], str], say: Callable[[str], None], interval: float | None = None):
        self.status, self.say = status, say
        self.interval = interval or progress_interval()
        self.started = self.last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def touch(self) -> None:
        self.last = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def start(self) -> "Heartbeat":
        self.started = self.last = time.monotonic()
        self._thread = threading.Thread(target=self._beat, name="stepwise-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def __enter__(self) -> "Heartbeat":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _beat(self) -> None:
        while not self._stop.wait(max(0.01, self.last + self.interval - time.monotonic())):
            if time.monotonic() - self.last >= self.interval:
                try:
                    self.say(self.status(self.elapsed))
                except Exception:  # a status that cannot be built this once must not end the thread
                    pass
                self.touch()


class Reporter:
    def __init__(self, enabled: bool = True, progress: bool = True, interval: float | None = None):
        self.enabled = enabled
        self.console = Console(highlight=False, soft_wrap=not sys.stdout.isatty())
        self.live = enabled and progress and sys.stdout.isatty()
        self.progress: Progress | None = None
        self.task = None
        self.writer = None
        self.fields = {"epoch": 0.0, "loss": float("nan"), "val": "-", "lr": 0.0, "tps": 0.0, "nonpad_tps": 0.0}
        self.heartbeat: Heartbeat | None = None
        self.interval = interval
        self.step = self.total = self.first_step = 0

    # --- lifecycle
    def open_tensorboard(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder))

    def start(self, total: int, completed: int) -> None:
        self.total, self.step, self.first_step = total, completed, completed
        if not self.live:
            if self.enabled:
                self.heartbeat = Heartbeat(self.status, self._say, self.interval).start()
            return
        self.progress = Progress(
            TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
            TextColumn("epoch {task.fields[epoch]:.2f}  loss {task.fields[loss]:.4f}  val {task.fields[val]}  "
                       "lr {task.fields[lr]:.2e}  {task.fields[tps]:,.0f} supervised / "
                       "{task.fields[nonpad_tps]:,.0f} non-padding tok/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console)
        self.progress.start()
        self.task = self.progress.add_task("train", total=total, completed=completed, **self.fields)

    def status(self, elapsed: float) -> str:
        """The heartbeat's line: where the run is, how long it has run and how long it has left."""
        done = self.step - self.first_step
        eta = f", ETA {duration(elapsed / done * (self.total - self.step))}" if done else ""
        return (f"step {self.step}/{self.total} epoch {self.fields['epoch']:.2f} loss {self.fields['loss']:.4f} "
                f"val {self.fields['val']}: {duration(elapsed)} elapsed{eta}")

    def _say(self, text: str) -> None:
        self.console.print(text, markup=False)
        if self.heartbeat:
            self.heartbeat.touch()

    def close(self) -> None:
        if self.heartbeat:
            self.heartbeat.stop()
            self.heartbeat = None
        if self.progress:
            self.progress.stop()
            self.progress = None
        if self.writer:
            self.writer.close()
            self.writer = None

    # --- events
    def info(self, text: str) -> None:
        if self.enabled:
            self._say(text)

    def error(self, text: str) -> None:
        if self.enabled:
            Console(stderr=True, soft_wrap=True).print(f"error: {text}", markup=False, highlight=False)

    def advance(self, step: int, epoch: float, loss: float, lr: float) -> None:
        self.step = step
        self.fields.update(epoch=epoch, loss=loss, lr=lr)
        if self.progress:
            self.progress.update(self.task, completed=step, **self.fields)

    def log(self, entry: dict) -> None:
        if not self.enabled:
            return
        self.fields["tps"] = entry.get("tokens_per_s") or 0.0
        self.fields["nonpad_tps"] = entry.get("nonpad_tokens_per_s") or 0.0
        if not self.live:
            nonpad = (f" / {self.fields['nonpad_tps']:,.0f} non-padding" if entry.get("nonpad_tokens_per_s") is not None
                      else "")
            grad_norm = "-" if entry.get("grad_norm") is None else f"{entry['grad_norm']:.3f}"
            self._say(f"step {entry['step']} epoch {entry['epoch']:.2f} loss {entry['train_loss']:.4f} "
                      f"lr {entry['lr']:.2e} grad_norm {grad_norm} {self.fields['tps']:,.0f} supervised{nonpad} tok/s")
        self._scalars(entry["step"], {"train/loss": entry.get("train_loss"), "train/lr": entry.get("lr"),
                                      "train/grad_norm": entry.get("grad_norm"),
                                      "train/tokens_per_s": entry.get("tokens_per_s"),
                                      "train/nonpad_tokens_per_s": entry.get("nonpad_tokens_per_s")})

    def evaluation(self, entry: dict) -> None:
        if not self.enabled:
            return
        self.fields["val"] = f"{entry['val_loss']:.4f}" if entry.get("val_loss") is not None else "-"
        self.info(f"eval step {entry['step']}: val_loss {self.fields['val']} "
                  f"ppl {entry.get('val_ppl', float('nan')):.2f} trend {entry.get('trend')}")
        self._scalars(entry["step"], {"val/loss": entry.get("val_loss"), "val/ppl": entry.get("val_ppl")})

    def checkpoint(self, path: Path, entry: dict, removed: list[Path]) -> None:
        scores = "  ".join(f"{k} {entry[k]:.3f}" for k in METRICS if k != "val_loss" and entry.get(k) is not None)
        self.info(f"checkpoint {path}" + (f"  {scores}" if scores else ""))
        for old in removed:
            self.info(f"removed {old} (--save_total_limit)")

    def samples(self, step: int, rows: list[dict], scores: dict) -> None:
        self._scalars(step, {f"heldout/{k}": v for k, v in scores.items()})
        if self.writer:
            text = "\n\n".join(f"**{r.get('key')}** {r.get('prompt')}\n\n> {r.get('response')}" for r in rows[:8])
            self.writer.add_text("heldout/samples", text, step)

    def finish(self, log, run_dir: Path) -> None:
        self.close()
        if not self.enabled:
            return
        table = Table(title=f"run {run_dir.name}", show_header=False)
        table.add_row("stopped", log.stop_reason or "-")
        best = log.best
        if best:
            table.add_row("best", f"step {best['step']} ({best['metric']} {best['value']:.4f}) -> {run_dir / 'final'}")
        table.add_row("trend", log.trend or "-")
        table.add_row("recommendation", log.recommendation or "-")
        self.console.print(table)

    def _scalars(self, step: int, values: dict) -> None:
        if self.writer:
            for name, value in values.items():
                if value is not None:
                    self.writer.add_scalar(name, value, step)
