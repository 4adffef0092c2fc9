"""Loading checkpoints for inference: any Hugging Face folder, step folder, final/ or hub id, with its
own tokenizer and chat template, and every loading mistake as one line naming the folder."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.core.catalog import WEIGHT_FILES, CheckpointInfo, checkpoint_info
from trainer.core.chat import ensure_chat_template
from trainer.core.errors import StepwiseError, first_line

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# transformers resolves model classes through lazy imports that are not thread-safe: the app's
# sides load at the same time, so loads take turns (they share the disk and cores anyway).
_LOAD_LOCK = threading.Lock()


@contextlib.contextmanager
def quiet_hub():
    """Hugging Face's progress bars off for the block (they would land in our log, the REPL and the
    eval display), restored after it."""
    from transformers.utils import logging

    bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            logging.enable_progress_bar()


def from_pretrained(loader, name: str, flag: str = "--pretrained_model"):
    """loader(name) (an AutoX.from_pretrained) with Hugging Face's progress bars off, since they
    would land in our log, the REPL and the eval display, and its errors as one line naming it."""
    label = f"{flag} {name}" if flag else name
    path = Path(name)
    if path.exists() and not (path / "config.json").is_file():
        raise StepwiseError(f"{label}: no config.json (not a Hugging Face model folder)")
    try:
        with quiet_hub():
            return loader(name)
    except (OSError, ValueError) as err:
        raise StepwiseError(f"{label}: could not load ({first_line(err)})") from None



@dataclass
class LoadedModel:
    path: Path
    model: object
    tokenizer: object
    info: CheckpointInfo | None = None

    @property
    def label(self) -> str:
        return self.info.label if self.info is not None else str(self.path)

    @property
    def nbytes(self) -> int:
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(name: str | None, flag: str = "--device") -> str:
    """The device to run on (default_device() for None), or a StepwiseError naming flag when torch
    does not know the name or this machine does not have that device."""
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):  # torch: "Expected one of cpu, cuda, ... device type at start of ..."
        raise StepwiseError(f"{flag} {name}: not a device (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise StepwiseError(f"{flag} {name}: no CUDA device on this machine (use --device cpu)")
        if device.index is not None and device.index >= count:
            raise StepwiseError(f"{flag} {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise StepwiseError(f"{flag} {name}: no MPS device on this machine (use --device cpu)")
    elif device.type != "cpu":
        raise StepwiseError(f"{flag} {name}: not supported here (cpu, cuda, cuda:N or mps)")
    return name


def is_hub_id(name: str) -> bool:
    """"org/name" is a hub id unless it exists or "org" is a local folder (then a mistyped
    checkpoint path fails at once, not after the hub client's retries)."""
    p = Path(name)
    return not (p.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1 or p.parent.is_dir())


def check_model_folder(path: str | Path) -> None:
    """A StepwiseError naming the folder unless it holds a config, weights and a tokenizer."""
    p = Path(path)
    if not p.is_dir():
        raise StepwiseError(f"{path}: no such checkpoint folder")
    if not (p / "config.json").is_file():
        raise StepwiseError(f"{path}: no config.json (not a Hugging Face model folder)")
    if not any((p / w).is_file() for w in WEIGHT_FILES):
        raise StepwiseError(f"{path}: no model weights ({WEIGHT_FILES[0]})")
    if not any((p / t).is_file() for t in TOKENIZER_FILES):
        raise StepwiseError(f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json)")


def load_model(path: str | Path, device: str | None = None) -> LoadedModel:
    """A step folder, final/, any Hugging Face folder or hub id, in eval mode with its own tokenizer
    and chat template. A folder that lacks weights or a tokenizer is a StepwiseError naming it."""
    p = Path(path)
    name = str(path)
    if not is_hub_id(name):
        check_model_folder(p)
    device = device or default_device()
    dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    with _LOAD_LOCK:
        tokenizer, model = _from_pretrained(name, dtype)
    ensure_chat_template(tokenizer)
    model.to(device).eval()
    model.requires_grad_(False)
    return LoadedModel(p, model, tokenizer, checkpoint_info(p) if p.is_dir() else None)


def _from_pretrained(name: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = from_pretrained(AutoTokenizer.from_pretrained, name, flag="")
    model = from_pretrained(lambda n: AutoModelForCausalLM.from_pretrained(n, dtype=dtype, use_safetensors=True),
                            name, flag="")
    return tokenizer, model
