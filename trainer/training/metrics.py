"""training_metrics.json: the history a person steers by, best-model tracking, early stopping, and the
decision guide (train longer, enough, or stop).

The file is rewritten atomically after every log and evaluation, so it can be read mid-run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trainer.core.catalog import METRICS_FILE
from trainer.core.config import METRICS
from trainer.core.errors import StepwiseError
from trainer.core.files import write_json_atomic

IMPROVING, PLATEAU, OVERFITTING = "improving", "plateau", "overfitting"


def improves(metric: str, value: float | None, best: float | None, threshold: float = 0.0) -> bool:
    """The one comparison behind best-model tracking (threshold 0) and early stopping: value beats
    best by more than threshold, in the metric's direction; the first finite value always does.
    A NaN or inf value never improves anything."""
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    gain = value - best if METRICS[metric] else best - value
    return gain > threshold


@dataclass
class EarlyStopping:
    """Stop after `patience` evaluations in a row without an improvement larger than `threshold`
    (absolute) over the best value so far; the first evaluation always counts as an improvement."""

    metric: str = "val_loss"
    patience: int | None = None
    threshold: float = 0.0
    best_value: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped: bool = False

    def update(self, value: float, step: int) -> bool:
        """Record one evaluation; True when the run should stop."""
        if improves(self.metric, value, self.best_value, self.threshold):
            self.best_value, self.best_step, self.bad_evals = value, step, 0
        else:
            self.bad_evals += 1
        self.stopped = self.patience is not None and self.bad_evals >= self.patience
        return self.stopped


def classify_trend(history: list[dict], tolerance: float = 0.005) -> str:
    """The decision guide on the evaluations so far.

    improving: the newest val loss is a new low by more than `tolerance` (relative);
    overfitting: val loss rose on the last two evaluations and sits above its low while train loss fell;
    plateau: anything else.
    """
    evals = [h for h in history if h.get("val_loss") is not None]
    if len(evals) < 2:
        return IMPROVING
    vals = [h["val_loss"] for h in evals]
    low = min(vals[:-1])
    if vals[-1] < low * (1 - tolerance):
        return IMPROVING
    if len(vals) >= 3 and vals[-1] > vals[-2] > vals[-3] and vals[-1] > low * (1 + tolerance):
        trains = [h.get("train_loss") for h in evals[-3:]]
        if None not in trains and trains[-1] < trains[0]:
            return OVERFITTING
    return PLATEAU


def recommend(trend: str, epoch: float, best: dict) -> str:
    """A final recommendation: train longer, enough, or stop."""
    where = f"final/ holds the best checkpoint (step {best.get('step')})" if best.get("step") else "no checkpoint yet"
    if trend == IMPROVING:
        more = max(1, round(epoch * 0.5)) if epoch >= 1 else 1
        return (f"still improving at epoch {epoch:.2f}: train longer, about {more} more epoch(s) "
                f"(--resume with a larger --max_steps or --num_epochs); {where}")
    if trend == OVERFITTING:
        return f"overfitting (val loss rising while train loss falls): stop, or lower the learning rate; {where}"
    return f"plateau: enough training, more epochs are unlikely to help; {where}"


@dataclass
class MetricsLog:
    """Everything in training_metrics.json."""

    path: Path
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=dict)
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)
    trend: str | None = None
    stop_reason: str | None = None
    recommendation: str | None = None
    data: dict = field(default_factory=dict)

    def entry(self, step: int) -> dict:
        """The history entry of a step, created on first use (log and eval of a step share one)."""
        if self.history and self.history[-1]["step"] == step:
            return self.history[-1]
        self.history.append({"step": step})
        return self.history[-1]

    def record(self, step: int, **values) -> dict:
        entry = self.entry(step)
        entry.update({k: v for k, v in values.items() if v is not None})
        return entry

    def save(self) -> None:
        write_json_atomic(self.path, {
            "history": self.history,
            "best": self.best,
            "early_stopping": asdict(self.early_stopping),
            "trend": self.trend,
            "stop_reason": self.stop_reason,
            "recommendation": self.recommendation,
            "data": self.data,
        })

    @classmethod
    def load(cls, path: Path) -> "MetricsLog":
        import json

        try:
            raw = json.loads(path.read_text())
            EarlyStopping(**raw["early_stopping"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise StepwiseError(f"{path}: damaged metrics file ({type(err).__name__}: {err})") from None
        return cls(path=path, history=raw["history"], best=raw.get("best") or {},
                   early_stopping=EarlyStopping(**raw["early_stopping"]), trend=raw.get("trend"),
                   stop_reason=None, recommendation=None, data=raw.get("data") or {})

    def truncate(self, step: int) -> None:
        """Forget entries after `step` (resuming from an older checkpoint than the last log)."""
        self.history = [h for h in self.history if h["step"] <= step]


def metrics_path(run_dir: Path) -> Path:
    return run_dir / METRICS_FILE
