"""What the person at the terminal sees: a rich progress bar, one-line events, TensorBoard scalars.

Only rank 0 reports. Without a terminal (or with --progress false) log entries print as plain lines.
"""

from __future__ import annotations

import sys
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


class Reporter:
    def __init__(self, enabled: bool = True, progress: bool = True):
        self.enabled = enabled
        self.console = Console(highlight=False, soft_wrap=not sys.stdout.isatty())
        self.live = enabled and progress and sys.stdout.isatty()
        self.progress: Progress | None = None
        self.task = None
        self.writer = None
        self.fields = {"epoch": 0.0, "loss": float("nan"), "val": "-", "lr": 0.0, "tps": 0.0}

    # --- lifecycle
    def open_tensorboard(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder))

    def start(self, total: int, completed: int) -> None:
        if not self.live:
            return
        self.progress = Progress(
            TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
            TextColumn("epoch {task.fields[epoch]:.2f}  loss {task.fields[loss]:.4f}  val {task.fields[val]}  "
                       "lr {task.fields[lr]:.2e}  {task.fields[tps]:,.0f} tok/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console)
        self.progress.start()
        self.task = self.progress.add_task("train", total=total, completed=completed, **self.fields)

    def close(self) -> None:
        if self.progress:
            self.progress.stop()
            self.progress = None
        if self.writer:
            self.writer.close()
            self.writer = None

    # --- events
    def info(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, markup=False)

    def error(self, text: str) -> None:
        if self.enabled:
            Console(stderr=True, soft_wrap=True).print(f"error: {text}", markup=False, highlight=False)

    def advance(self, step: int, epoch: float, loss: float, lr: float) -> None:
        self.fields.update(epoch=epoch, loss=loss, lr=lr)
        if self.progress:
            self.progress.update(self.task, completed=step, **self.fields)

    def log(self, entry: dict) -> None:
        if not self.enabled:
            return
        self.fields["tps"] = entry.get("tokens_per_s") or 0.0
        if not self.live:
            self.console.print(
                f"step {entry['step']} epoch {entry['epoch']:.2f} loss {entry['train_loss']:.4f} "
                f"lr {entry['lr']:.2e} grad_norm {entry['grad_norm']:.3f} {self.fields['tps']:,.0f} tok/s",
                markup=False)
        self._scalars(entry["step"], {"train/loss": entry.get("train_loss"), "train/lr": entry.get("lr"),
                                      "train/grad_norm": entry.get("grad_norm"),
                                      "train/tokens_per_s": entry.get("tokens_per_s")})

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
