"""LoRA adapter checkpoints (PEFT's format: adapter_config.json naming the base, adapter_model.safetensors)
loaded for inference on a base model that is loaded once and shared.

Every adapter of a run sits on the same base. The base's weights are loaded once per (base, dtype,
device) into `BaseModels`; each adapter then gets its own module tree over those same weight tensors
(a deep copy whose memo maps every parameter and buffer to itself: structure copied, tensors shared),
and peft injects the adapter's LoRA layers into that tree only. So switching a column between adapters
of one run loads a few megabytes and never the base, and two adapters generate at the same time
without peft's one-active-adapter switch (set_adapter) racing between threads.
"""

from __future__ import annotations

import copy
import json
import threading
import warnings
from itertools import chain
from pathlib import Path

import torch

from trainer.core.catalog import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from trainer.core.errors import StepwiseError, first_line
from trainer.inference.gguf import gguf_folder, is_gguf, packaged_file


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_config(path: str | Path) -> dict:
    """adapter_config.json, or a StepwiseError naming it when it is damaged."""
    f = Path(path) / ADAPTER_CONFIG
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise StepwiseError(f"{f}: damaged adapter config ({first_line(err)})") from None
    if not isinstance(cfg, dict) or not cfg.get("base_model_name_or_path"):
        raise StepwiseError(f"{f}: names no base model (base_model_name_or_path)")
    return cfg


def check_adapter_folder(path: str | Path) -> None:
    """A StepwiseError naming the folder unless its adapter config and weights are intact."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    adapter_config(p)
    weights = p / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise StepwiseError(f"{path}: no adapter weights ({ADAPTER_WEIGHTS})")
    try:
        with safe_open(str(weights), framework="pt") as fh:
            fh.keys()
    except (SafetensorError, OSError) as err:
        raise StepwiseError(f"{path}: {ADAPTER_WEIGHTS} is damaged or cut short ({first_line(err)})") from None


def base_name(path: str | Path) -> str:
    """The base model an adapter folder was trained on: a folder or a hub id, as adapter_config.json
    names it. When that folder is gone and the run trained from a .gguf file (the folder was its
    converted cache), the file named in the run's config.yaml is converted again."""
    name = adapter_config(path)["base_model_name_or_path"]
    if Path(name).exists() or not name.startswith("/"):
        return name
    source = _run_pretrained_model(Path(path))
    if source is not None:
        source = packaged_file(source, flag=f"{path}: base model")
        if is_gguf(source) and Path(source).is_file():
            return str(gguf_folder(source, flag=f"{path}: base model", log=None))
    return name


def _run_pretrained_model(path: Path) -> str | None:
    """--pretrained_model of the run a checkpoint belongs to (its config.yaml), if it can be read."""
    import yaml

    for folder in (path.parent, path.parent.parent):  # step-N/ or final/adapter/
        try:
            saved = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(saved, dict) and isinstance(saved.get("model"), dict):
            return saved["model"].get("pretrained_model")
    return None


class BaseModels:
    """Base models of adapter checkpoints, each loaded once and kept while any adapter on it is in use.
    Thread-safe: two columns asking for one base at once load it once. `loads` counts real loads."""

    def __init__(self):
        self._models: dict[tuple, torch.nn.Module] = {}
        self._lock = threading.Lock()
        self._loading: dict[tuple, threading.Lock] = {}
        self.loads = 0

    def get(self, name: str, dtype: torch.dtype, device: str, load) -> torch.nn.Module:
        """The base `name` (loaded with load(name, dtype) the first time), on device, frozen, in eval mode."""
        key = (name, str(dtype), device)
        with self._lock:
            if key in self._models:
                return self._models[key]
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                if key in self._models:
                    return self._models[key]
            model = load(name, dtype)
            model.to(device).eval()
            model.requires_grad_(False)
            with self._lock:
                self._models[key] = model
                self._loading.pop(key, None)
                self.loads += 1
            return model

    def keep_only(self, names: set[str]) -> None:
        """Drop the bases no cached adapter uses any more."""
        with self._lock:
            for key in [k for k in self._models if k[0] not in names]:
                del self._models[key]

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(tensor_bytes(m) for m in self._models.values())


def tensor_bytes(model: torch.nn.Module, skip: set[int] = frozenset()) -> int:
    """Bytes of a model's parameters and buffers, each tensor once, those in skip (by id) left out."""
    seen = {id(t): t for t in chain(model.parameters(), model.buffers()) if id(t) not in skip}
    return sum(t.numel() * t.element_size() for t in seen.values())


def shared_copy(base: torch.nn.Module) -> torch.nn.Module:
    """A new module tree over the base's own parameter and buffer tensors (none is copied)."""
    memo = {id(t): t for t in chain(base.parameters(), base.buffers())}
    return copy.deepcopy(base, memo)


def attach_adapter(base: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """The base with the adapter at path applied, as a plain transformers model (LoRA layers inside)
    that generates like any other; the base itself is left untouched."""
    from peft import PeftModel

    try:
        with warnings.catch_warnings():  # peft asks a deprecated transformers property (FutureWarning)
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = PeftModel.from_pretrained(shared_copy(base), str(path), is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise StepwiseError(f"{path}: could not apply the adapter to its base ({first_line(err)})") from None
    model = peft_model.get_base_model()
    model.eval()
    model.requires_grad_(False)
    return model
