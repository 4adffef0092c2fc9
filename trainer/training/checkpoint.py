"""Writing checkpoint folders (layout in README "A run folder"): whole or not at all, then rotated.

A checkpoint is a Hugging Face model folder (safetensors weights, config, generation config,
tokenizer with its chat template) plus `trainer_state.json` and, for resuming, the optimizer, scheduler
and RNG states as safetensors + JSON: nothing in a checkpoint is unpickled when it is loaded.
Finding checkpoints again is trainer.core.catalog's job.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from trainer.core.catalog import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    STATE_FILE,
    list_steps,
    step_dir_name,
)
from trainer.core.errors import StepwiseError, first_line
from trainer.core.files import read_json, write_json_atomic, write_text_atomic
from trainer.inference.adapters import base_name, is_adapter
from trainer.inference.hub import quiet_hub
from trainer.inference.loading import load_causal_lm

# --- writing -------------------------------------------------------------------------------------

def _optimizer_tensors(optimizer: torch.optim.Optimizer | dict) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()  # a dict: gathered under FSDP
    tensors, scalars = {}, {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def read_optimizer_state(folder: Path) -> dict:
    """The optimizer state dict saved in a checkpoint (parameters by index, as one process numbers them)."""
    meta = read_json(folder / "optimizer.json")
    tensors = load_file(folder / "optimizer.safetensors")
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


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
    with quiet_hub():  # its shard-writing bar would interleave with ours
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, optimizer, scheduler, state: dict,
                    samples: list[dict] | None = None) -> Path:
    """Write step-NNNNNN/ under a temporary name, then rename it into place. A write that fails (disk
    full, say) removes the temporary folder and is one StepwiseError naming the folder and the cause;
    earlier checkpoints are untouched."""
    final = run_dir / step_dir_name(step)
    tmp = run_dir / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
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
            write_text_atomic(tmp / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
        write_json_atomic(tmp / STATE_FILE, state)
    except Exception as err:  # OSError, safetensors' SafetensorError, ...: the checkpoint was not written
        shutil.rmtree(tmp, ignore_errors=True)
        raise StepwiseError(f"{final}: could not write the checkpoint ({first_line(err)}); the earlier "
                            "checkpoints are intact: free space and --resume") from None
    _replace_folder(tmp, final)
    return final


def _replace_folder(new: Path, target: Path) -> None:
    """Rename new to target; an existing target (a re-save of the same step, a new final/) is moved
    aside first and removed after, so some complete copy exists at every moment."""
    old = target.with_name(f".old-{target.name}")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def clean_leftovers(run_dir: Path) -> list[Path]:
    """Remove what an interrupted write left in a run folder (.tmp-*, .old-* folders, .*.tmp files).
    A complete checkpoint is never among them: it only appears under its own name."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir()
             if (p.is_dir() and p.name.startswith((".tmp-", ".old-"))) or (p.name.startswith(".") and p.name.endswith(".tmp"))]
    for p in found:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return found


def weights_finite(folder: Path) -> bool:
    """Every tensor in the folder's safetensors weights is finite (read tensor by tensor)."""
    files = sorted(folder.glob("*.safetensors"))
    files = [f for f in files if f.name not in ("optimizer.safetensors", "rng.safetensors")]
    files += sorted((folder / "adapter").glob("*.safetensors"))
    for f in files:
        with safe_open(f, framework="pt") as fh:
            for key in fh.keys():
                t = fh.get_tensor(key)
                if t.is_floating_point() and not torch.isfinite(t).all():
                    return False
    return bool(files)


def model_finite(model) -> bool:
    """No parameter holds a NaN or inf (checked before a checkpoint is written). Sharded (FSDP) parameters
    are checked shard by shard and the ranks agree, so every rank gets the same answer."""
    params = list(model.parameters())
    local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
    finite = all(bool(torch.isfinite(p).all()) for p in local)
    if any(isinstance(p, DTensor) for p in params):
        flag = torch.tensor(float(finite), device=local[0].device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        finite = bool(flag.item())
    return finite


def load_training_state(folder: Path, optimizer, scheduler, load_optimizer=None) -> dict:
    """Restore optimizer, scheduler and RNG from a checkpoint; return its trainer_state. load_optimizer:
    what restores a sharded optimizer instead (trainer.training.distributed.optimizer_loader)."""
    if load_optimizer is not None:
        load_optimizer(folder)
    else:
        optimizer.load_state_dict(read_optimizer_state(folder))
    scheduler.load_state_dict(read_json(folder / "scheduler.json"))
    set_rng_state(folder)
    return read_json(folder / STATE_FILE)


def write_final(run_dir: Path, best: Path) -> Path:
    """Copy the best checkpoint's model, tokenizer, state and samples to final/ (atomically). A LoRA
    checkpoint is merged into its base there (plain HF weights: AutoModelForCausalLM, lm-eval, vLLM),
    with the adapter itself kept beside it in final/adapter/."""
    final, tmp = run_dir / "final", run_dir / ".tmp-final"
    shutil.rmtree(tmp, ignore_errors=True)
    skip = {"optimizer.safetensors", "optimizer.json", "scheduler.json", "rng.safetensors", "rng.json"}
    try:
        shutil.copytree(best, tmp, ignore=lambda _d, names: [n for n in names if n in skip])
        if is_adapter(tmp):
            write_merged(tmp)
    except (OSError, StepwiseError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StepwiseError(f"{final}: could not write the best checkpoint ({first_line(err)}); "
                            f"{best} is intact") from None
    _replace_folder(tmp, final)
    return final


ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "README.md")  # README.md: peft's model card


def write_merged(folder: Path) -> None:
    """Turn an adapter folder into full merged weights, its adapter files moved to folder/adapter/."""
    from peft import PeftModel

    adapter = folder / "adapter"
    adapter.mkdir()
    for name in ADAPTER_FILES:
        if (folder / name).is_file():
            os.replace(folder / name, adapter / name)
    base = load_causal_lm(base_name(adapter), torch.float32, flag=f"{adapter}: base model")
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    if not model_finite(merged):
        raise StepwiseError(f"{folder}: the merged weights are not finite")
    with quiet_hub():
        merged.save_pretrained(folder, safe_serialization=True)


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
