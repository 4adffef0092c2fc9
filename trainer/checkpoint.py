"""Checkpoint folders (design section 3): written whole or not at all, found again, rotated.

A checkpoint is a Hugging Face model folder (safetensors weights, config, generation config,
tokenizer with its chat template) plus `trainer_state.json` and, for resuming, the optimizer, scheduler
and RNG states as safetensors + JSON: nothing in a checkpoint is unpickled when it is loaded.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trainer.errors import StepwiseError

STEP_RE = re.compile(r"^step-(\d{6,})$")
STATE_FILE = "trainer_state.json"
METRICS_FILE = "training_metrics.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def write_json_atomic(path: Path, data) -> None:
    """A temp file in the same folder, then os.replace: a reader never sees half a file, and two
    writers at once never share a temp name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, ensure_ascii=False, default=float)
            fh.write("\n")
        # mkstemp makes the file 0600; give it the mode a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_json(path: Path):
    return json.loads(Path(path).read_text())


# --- writing -------------------------------------------------------------------------------------

def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _load_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    meta = read_json(folder / "optimizer.json")
    tensors = load_file(folder / "optimizer.safetensors")
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    return tensors, {"python": random.getstate()}


def set_rng_state(folder: Path) -> None:
    tensors = load_file(folder / "rng.safetensors")
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = read_json(folder / "rng.json")["python"]
    random.setstate((version, tuple(internal), gauss))


def save_hf(model, tokenizer, folder: Path) -> None:
    """The Hugging Face part: loads with AutoModelForCausalLM / AutoTokenizer.from_pretrained."""
    from transformers.utils import logging

    logging.disable_progress_bar()  # its shard-writing bar would interleave with ours
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, optimizer, scheduler, state: dict,
                    samples: list[dict] | None = None) -> Path:
    """Write step-NNNNNN/ under a temporary name, then rename it into place."""
    final = run_dir / step_dir_name(step)
    tmp = run_dir / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_hf(model, tokenizer, tmp)
    tensors, meta = _optimizer_tensors(optimizer)
    save_file(tensors, tmp / "optimizer.safetensors")
    write_json_atomic(tmp / "optimizer.json", meta)
    write_json_atomic(tmp / "scheduler.json", scheduler.state_dict())
    rng_tensors, rng_meta = rng_state()
    save_file(rng_tensors, tmp / "rng.safetensors")
    write_json_atomic(tmp / "rng.json", rng_meta)
    if samples is not None:
        (tmp / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    write_json_atomic(tmp / STATE_FILE, state)
    if final.exists():  # a re-save of the same step (e.g. an interrupt right after a checkpoint)
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_training_state(folder: Path, optimizer, scheduler) -> dict:
    """Restore optimizer, scheduler and RNG from a checkpoint; return its trainer_state."""
    _load_optimizer(optimizer, folder)
    scheduler.load_state_dict(read_json(folder / "scheduler.json"))
    set_rng_state(folder)
    return read_json(folder / STATE_FILE)


def write_final(run_dir: Path, best: Path) -> Path:
    """Copy the best checkpoint's model, tokenizer, state and samples to final/ (atomically)."""
    final, tmp = run_dir / "final", run_dir / ".tmp-final"
    shutil.rmtree(tmp, ignore_errors=True)
    skip = {"optimizer.safetensors", "optimizer.json", "scheduler.json", "rng.safetensors", "rng.json"}
    shutil.copytree(best, tmp, ignore=lambda _d, names: [n for n in names if n in skip])
    old = run_dir / ".old-final"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def rotate(run_dir: Path, limit: int | None, best_step: int | None) -> list[Path]:
    """Keep at most `limit` step folders: the best plus the newest others. With limit 1 and an old
    best, the newest is kept as well so the run can still resume (as Hugging Face Trainer does)."""
    steps = list_steps(run_dir)
    if limit is None or len(steps) <= limit:
        return []
    newest = steps[-1]
    keep = {best_step} if best_step is not None else set()
    others = [s for s in reversed(steps) if s not in keep]
    keep.update(others[: max(limit - len(keep), 0)])
    keep.add(newest)
    removed = []
    for s in steps:
        if s not in keep:
            shutil.rmtree(run_dir / step_dir_name(s))
            removed.append(run_dir / step_dir_name(s))
    return removed


# --- finding checkpoints -------------------------------------------------------------------------

def list_steps(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints of a run, oldest first (temporary folders are not listed)."""
    if not run_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in run_dir.iterdir() if p.is_dir() and (m := STEP_RE.match(p.name)))


def is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / w).is_file() for w in WEIGHT_FILES)


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

    @property
    def label(self) -> str:
        name = (f"final = step {self.step}" if self.step is not None else "final") if self.is_final else f"step {self.step}"
        loss = f" val {self.val_loss:.3f}" if self.val_loss is not None else ""
        return f"{self.run} / {name}{loss}{' (best)' if self.is_best else ''}"


@dataclass
class RunInfo:
    path: Path
    name: str
    checkpoints: list[CheckpointInfo]
    metrics: dict

    @property
    def mtime(self) -> float:
        return max([self.path.stat().st_mtime] + [c.path.stat().st_mtime for c in self.checkpoints])


def _read_json_or_empty(path: Path) -> dict:
    """A run's JSON files are for display here: a missing or damaged one shows as nothing known."""
    try:
        data = read_json(path)
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def read_run(run_dir: Path) -> RunInfo:
    """A run folder's checkpoints (steps in order, then final) with val loss and best marks."""
    metrics = _read_json_or_empty(run_dir / METRICS_FILE)
    best_step = (metrics.get("best") or {}).get("step")
    val_by_step = {h["step"]: h["val_loss"] for h in metrics.get("history", []) if h.get("val_loss") is not None}
    infos = []
    for step in list_steps(run_dir):
        folder = run_dir / step_dir_name(step)
        state = _read_json_or_empty(folder / STATE_FILE)
        infos.append(CheckpointInfo(folder, run_dir.name, step, state.get("val_loss", val_by_step.get(step)),
                                    is_best=step == best_step, metrics=state.get("metrics", {})))
    final = run_dir / "final"
    if is_checkpoint(final):
        state = _read_json_or_empty(final / STATE_FILE)
        infos.append(CheckpointInfo(final, run_dir.name, state.get("step"), state.get("val_loss"),
                                    is_final=True, metrics=state.get("metrics", {})))
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
