"""Loading checkpoints for inference: any Hugging Face folder, step folder, final/ or hub id, with its
own tokenizer and chat template, and every loading mistake as one line naming the folder.

Weights are safetensors only: a folder with nothing but pickled weights (pytorch_model.bin) is
refused, since unpickling a file can run code. A damaged weights file, a config.json whose sizes do
not match the weights, and a hub id while the hub cannot be reached are each one line too.

A `.gguf` file (llama.cpp's format) is converted once into a cached Hugging Face folder (gguf_folder)
and then loads as that folder does. A LoRA adapter folder loads on its base, which is loaded once and
shared by every adapter on it (trainer.inference.adapters).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.core.catalog import WEIGHT_FILES, CheckpointInfo, checkpoint_info
from trainer.core.chat import ensure_chat_template
from trainer.core.errors import StepwiseError, first_line
from trainer.inference.adapters import (
    BaseModels,
    attach_adapter,
    base_name,
    check_adapter_folder,
    is_adapter,
    tensor_bytes,
)
from trainer.inference.gguf import PACKAGE_PREFIX, gguf_folder, is_gguf, packaged_file
from trainer.inference.hub import (
    LOAD_LOCK,
    held_logs,
    hub_access,
    offline_error,
    quiet_hub,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def from_pretrained(loader, name: str, flag: str = "--pretrained_model", offline: str | None = None,
                    needs_config: bool = True):
    """loader(name) (an AutoX.from_pretrained) with Hugging Face's progress bars off, since they
    would land in our log, the REPL and the eval display, and its errors as one line naming it.
    offline: hub_access(name)'s reason, when the hub cannot be reached (the cache is used).
    needs_config=False: a folder without config.json is fine (an adapter folder's tokenizer)."""
    label = f"{flag} {name}" if flag else name
    path = Path(name)
    if needs_config and path.exists() and not (path / "config.json").is_file():
        raise StepwiseError(f"{label}: no config.json (not a Hugging Face model folder)")
    from safetensors import SafetensorError

    try:
        with quiet_hub():
            return loader(name, **({"local_files_only": True} if offline else {}))
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        if offline:
            raise offline_error(label, offline) from None
        raise StepwiseError(f"{label}: could not load ({first_line(err)})") from None


def check_weights(path: Path, label: str) -> None:
    """A StepwiseError naming the folder when its weights are pickled only, or a safetensors file is
    empty, cut short or damaged (its header is read and checked against the file's size: cheap,
    no tensor is loaded)."""
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise StepwiseError(f"{label}: {index.name} is damaged ({first_line(err)})") from None
        files = [path / shard for shard in shards]
    else:
        pickled = next((w for w in PICKLED_WEIGHTS if (path / w).is_file()), None)
        if pickled is not None:
            raise StepwiseError(
                f"{label}: only pickled weights ({pickled}), and Stepwise never unpickles a checkpoint (it can run "
                f"code); if you trust the file, convert it once to safetensors: python -c \"from transformers import "
                f"AutoModelForCausalLM as M; M.from_pretrained('{path}').save_pretrained('{path}')\"")
        return
    from safetensors import SafetensorError, safe_open

    for f in files:
        if not f.is_file():
            raise StepwiseError(f"{label}: {f.name} is missing (listed in {index.name})")
        if f.stat().st_size == 0:
            raise StepwiseError(f"{label}: {f.name} is empty (0 bytes); the checkpoint was not written completely")
        try:
            with safe_open(str(f), framework="pt") as fh:
                fh.keys()
        except (SafetensorError, OSError) as err:
            raise StepwiseError(f"{label}: {f.name} is damaged or cut short ({first_line(err)})") from None


def weights_mismatch(info: dict) -> str | None:
    """What does not match between config.json and the weights, from from_pretrained's loading info."""
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        key, in_file, by_config = mismatched[0]
        return (f"{len(mismatched)} weight(s) have other sizes than config.json says, e.g. {key} is "
                f"{list(in_file)} in the weights but {list(by_config)} by config.json")
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        return f"{len(missing)} weight(s) that config.json asks for are not in the weights, e.g. {missing[0]}"
    return None


def load_causal_lm(name: str, dtype: torch.dtype, flag: str = "--pretrained_model", offline: str | None = None):
    """AutoModelForCausalLM from a folder or hub id: safetensors only, checked first (local folders),
    and a config that does not match the weights refused in one line instead of a size table."""
    from transformers import AutoModelForCausalLM

    label = f"{flag} {name}" if flag else name
    if Path(name).is_dir():
        check_weights(Path(name), label)

    def load(n, **kw):
        # ignore_mismatched_sizes only lets loading finish, so what does not match is known and
        # reported here in one line; such a model is never returned.
        return AutoModelForCausalLM.from_pretrained(n, dtype=dtype, use_safetensors=True, ignore_mismatched_sizes=True,
                                                    output_loading_info=True, **kw)

    with held_logs("transformers"):
        model, info = from_pretrained(load, name, flag, offline)
        problem = weights_mismatch(info)
        if problem:
            raise StepwiseError(f"{label}: config.json does not match the weights ({problem})")
    return model


@dataclass
class LoadedModel:
    path: Path
    model: object
    tokenizer: object
    info: CheckpointInfo | None = None
    base: str | None = None
    """The base model an adapter checkpoint runs on (shared, held in BaseModels), None for full weights."""
    shared: frozenset = field(default_factory=frozenset)
    """ids of the tensors that belong to the shared base, not to this model."""

    @property
    def label(self) -> str:
        return self.info.label if self.info is not None else str(self.path)

    @property
    def nbytes(self) -> int:
        """Bytes this model holds on its own (an adapter's LoRA weights; the whole model otherwise)."""
        return tensor_bytes(self.model, self.shared)


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
    """A StepwiseError naming the folder unless it holds a config, intact safetensors weights (or a LoRA
    adapter) and a tokenizer."""
    p = Path(path)
    if not p.is_dir():
        raise StepwiseError(f"{path}: no such checkpoint folder")
    if is_adapter(p):
        check_adapter_folder(p)
    else:
        if not (p / "config.json").is_file():
            raise StepwiseError(f"{path}: no config.json (not a Hugging Face model folder)")
        check_weights(p, str(path))
        if not any((p / w).is_file() for w in WEIGHT_FILES):
            raise StepwiseError(f"{path}: no model weights ({WEIGHT_FILES[0]})")
    if not any((p / t).is_file() for t in TOKENIZER_FILES):
        raise StepwiseError(f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json)")


def load_model(path: str | Path, device: str | None = None, log=None, bases: BaseModels | None = None) -> LoadedModel:
    """A step folder, final/, any Hugging Face folder, hub id or .gguf file (converted once, said
    through log: gguf_folder), in eval mode with its own tokenizer and chat template. A folder that
    lacks weights or a tokenizer is a StepwiseError naming it. An adapter folder loads on its base,
    taken from (or loaded once into) bases."""
    path = packaged_file(str(path), flag="") if str(path).startswith(PACKAGE_PREFIX) else path
    p = Path(path)
    if p.is_dir() and is_adapter(p):
        return load_adapter(p, device, bases if bases is not None else BaseModels())
    name = str(gguf_folder(p, flag="", log=log)) if is_gguf(path) else str(path)
    if not is_hub_id(name):
        check_model_folder(name)
    device = device or default_device()
    dtype = inference_dtype(device)
    with LOAD_LOCK:
        tokenizer, model = _from_pretrained(name, dtype)
    ensure_chat_template(tokenizer)
    model.to(device).eval()
    model.requires_grad_(False)
    return LoadedModel(p, model, tokenizer, checkpoint_info(p) if p.is_dir() else None)


def inference_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32


def load_adapter(path: Path, device: str | None, bases: BaseModels) -> LoadedModel:
    """A LoRA adapter folder on its base (loaded once per base into bases), with the folder's tokenizer."""
    from transformers import AutoTokenizer

    check_adapter_folder(path)
    if not any((path / t).is_file() for t in TOKENIZER_FILES):
        raise StepwiseError(f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    device = device or default_device()
    base = base_name(path)

    def load_base(name: str, dtype: torch.dtype):
        if not is_hub_id(name) and not Path(name).is_dir():
            raise StepwiseError(f"{path}: its base model {name} is not there any more (adapter_config.json names it)")
        with LOAD_LOCK:
            return load_causal_lm(name, dtype, flag=f"{path}: base model", offline=hub_access(name))

    base_model = bases.get(base, inference_dtype(device), device, load_base)
    with LOAD_LOCK:
        tokenizer = from_pretrained(AutoTokenizer.from_pretrained, str(path), flag="", needs_config=False)
    ensure_chat_template(tokenizer)
    model = attach_adapter(base_model, path)
    shared = frozenset(id(t) for t in list(base_model.parameters()) + list(base_model.buffers()))
    return LoadedModel(path, model, tokenizer, checkpoint_info(path), base=base, shared=shared)


def _from_pretrained(name: str, dtype: torch.dtype):
    from transformers import AutoTokenizer

    offline = hub_access(name)
    tokenizer = from_pretrained(AutoTokenizer.from_pretrained, name, flag="", offline=offline)
    return tokenizer, load_causal_lm(name, dtype, flag="", offline=offline)
