"""The run/checkpoint catalogue: which runs and checkpoints exist under a root, what their runs
recorded about them, and the one label every front end shows for a checkpoint.

A run folder holds step-NNNNNN/ checkpoints (complete ones only: they are written under a temporary
name and renamed into place), final/ (the best, copied), config.yaml and training_metrics.json.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from trainer.core.errors import StepwiseError
from trainer.core.files import read_json_or_empty

STEP_RE = re.compile(r"^step-(\d{6,})$")
STATE_FILE = "trainer_state.json"
METRICS_FILE = "training_metrics.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def list_steps(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints of a run, oldest first (temporary folders are not listed)."""
    if not run_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in run_dir.iterdir() if p.is_dir() and (m := STEP_RE.match(p.name)))


def is_checkpoint(path: Path) -> bool:
    """Full weights (config.json and safetensors) or a LoRA adapter (PEFT's two files)."""
    full = (path / "config.json").is_file() and any((path / w).is_file() for w in WEIGHT_FILES)
    return full or ((path / ADAPTER_CONFIG).is_file() and (path / ADAPTER_WEIGHTS).is_file())


def adapter_note(path: Path) -> str | None:
    """`LoRA r=8` for an adapter folder, `LoRA r=8, merged` for a final/ merged from one (its adapter
    kept in final/adapter/), else None."""
    rank = read_json_or_empty(path / ADAPTER_CONFIG).get("r")
    if rank is not None:
        return f"LoRA r={rank}"
    rank = read_json_or_empty(path / "adapter" / ADAPTER_CONFIG).get("r")
    return f"LoRA r={rank}, merged" if rank is not None else None


@dataclass
class CheckpointInfo:
    """One loadable checkpoint of a run, with what the run recorded about it."""

    path: Path
    run: str
    step: int | None
    val_loss: float | None = None
    is_final: bool = False
    is_best: bool = False
    metrics: dict = field(default_factory=dict)
    adapter: str | None = None
    """`LoRA r=8` (an adapter folder), `LoRA r=8, merged` (final/ of a LoRA run), None for full weights."""

    @property
    def where(self) -> str:
        """`step 500`, `final (step 900)` or `final`."""
        if not self.is_final:
            return f"step {self.step}"
        return f"final (step {self.step})" if self.step is not None else "final"

    @property
    def label(self) -> str:
        """`run · step 500 · LoRA r=8 · val 1.234 · best`: the one name every front end shows."""
        adapter = f" · {self.adapter}" if self.adapter else ""
        loss = f" · val {self.val_loss:.3f}" if self.val_loss is not None else ""
        return f"{self.run} · {self.where}{adapter}{loss}{' · best' if self.is_best else ''}"


@dataclass
class RunInfo:
    path: Path
    name: str
    checkpoints: list[CheckpointInfo]
    metrics: dict

    @property
    def mtime(self) -> float:
        return max([self.path.stat().st_mtime] + [c.path.stat().st_mtime for c in self.checkpoints])


def read_run(run_dir: Path) -> RunInfo:
    """A run folder's checkpoints (steps in order, then final) with val loss and best marks."""
    metrics = read_json_or_empty(run_dir / METRICS_FILE)
    best_step = (metrics.get("best") or {}).get("step")
    val_by_step = {h["step"]: h["val_loss"] for h in metrics.get("history", []) if h.get("val_loss") is not None}
    infos = []
    for step in list_steps(run_dir):
        folder = run_dir / step_dir_name(step)
        state = read_json_or_empty(folder / STATE_FILE)
        infos.append(CheckpointInfo(folder, run_dir.name, step, state.get("val_loss", val_by_step.get(step)),
                                    is_best=step == best_step, metrics=state.get("metrics", {}),
                                    adapter=adapter_note(folder)))
    final = run_dir / "final"
    if is_checkpoint(final):
        state = read_json_or_empty(final / STATE_FILE)
        infos.append(CheckpointInfo(final, run_dir.name, state.get("step"), state.get("val_loss"),
                                    is_final=True, metrics=state.get("metrics", {}), adapter=adapter_note(final)))
    return RunInfo(run_dir, run_dir.name, infos, metrics)


def list_runs(root: str | Path) -> list[RunInfo]:
    """Every run under root that has at least one checkpoint, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [read_run(p) for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    return sorted((r for r in runs if r.checkpoints), key=lambda r: r.mtime, reverse=True)


def newest_run(root: str | Path) -> RunInfo:
    runs = list_runs(root)
    if not runs:
        raise StepwiseError(f"{root}: no runs with checkpoints (run `make train` first)")
    return runs[0]


def checkpoint_info(path: str | Path) -> CheckpointInfo | None:
    """What the run recorded about a step folder or final/, or None for a folder outside any run."""
    path = Path(path)
    if not (STEP_RE.match(path.name) or path.name == "final"):
        return None
    try:
        run = read_run(path.parent)
    except OSError:  # an unreadable run folder must not stop a model loading
        return None
    return next((c for c in run.checkpoints if c.path.resolve() == path.resolve()), None)


def checkpoint_label(path: str | Path) -> str:
    """CheckpointInfo.label for a checkpoint in a run, `parent/name` for any other folder."""
    info = checkpoint_info(path)
    return info.label if info is not None else f"{Path(path).parent.name}/{Path(path).name}"


def weights_identity(path: str | Path) -> dict:
    """Path, size and mtime of the weights file: a rewritten checkpoint (final/ gets a new best) is new."""
    p = Path(path)
    weights = next((p / w for w in (*WEIGHT_FILES, ADAPTER_WEIGHTS) if (p / w).is_file()), None)
    if weights is None:
        return {"model": path}
    stat = weights.stat()
    return {"weights": str(weights.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
