"""Files every layer reads and writes: atomic JSON, tolerant JSON for display, JSON Lines, hashes."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from trainer.core.errors import StepwiseError


def write_json_atomic(path: Path, data) -> None:
    """A temp file in the same folder, then os.replace: a reader never sees half a file, and two
    writers at once never share a temp name."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=float) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """write_json_atomic's rule for any text file (config.yaml, samples.jsonl)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        # mkstemp makes the file 0600; give it the mode a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_json_or_empty(path: Path) -> dict:
    """A JSON object read for display: a missing or damaged file shows as nothing known."""
    try:
        data = read_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def read_jsonl(path: str | Path, what: str) -> Iterator[tuple[int, str, object]]:
    """(line number, "file:line", parsed value) for every non-blank line of a JSON Lines file; an
    unreadable file or an invalid line is a one-line StepwiseError naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StepwiseError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise StepwiseError(f"{path}: is a directory, expected a JSON Lines {what}") from None
    except UnicodeDecodeError as err:
        raise StepwiseError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{line}"
        try:
            yield line, where, json.loads(raw)
        except json.JSONDecodeError as err:
            raise StepwiseError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None


def read_jsonl_lenient(path: Path) -> tuple[list[dict], int]:
    """(the JSON objects, the number of bad non-blank lines) of a JSON Lines file read for display or
    counting (votes, samples): a torn last line or a hand-edited bad one is skipped, not fatal; a
    missing file is empty."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, IsADirectoryError):
        return [], 0
    rows, bad = [], 0
    for raw in text.splitlines():
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
