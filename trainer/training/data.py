"""Loading instruction data: files or hub ids through `datasets`, normalised to chat messages.

Every record becomes `{"messages": [{"role", "content"}, ...], "line": N}`: an Alpaca record is a user
turn (instruction, then input if any) and an assistant turn (output); `messages` records are taken as
they are; ShareGPT `conversations` (`from`/`value`) are renamed. Malformed records are skipped with a
count and their first line numbers, or rejected with `file:line` under `--strict`. A line (or a JSON
array's record, or a CSV row) with bytes that are not UTF-8 is one such malformed record.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from trainer.core.chat import prompt_text
from trainer.core.errors import StepwiseError, first_line
from trainer.inference.hub import held_logs, hub_unreachable, offline_error

FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
NOT_UTF8 = "not UTF-8 text"
# Files are decoded with errors="surrogateescape": each byte that is not UTF-8 becomes one lone
# surrogate (U+DC80-U+DCFF), which valid UTF-8 text never decodes to, so a bad record is found
# by searching its text instead of the whole file failing to decode.
BAD_BYTE = re.compile("[\udc80-\udcff]")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class LoadReport:
    """What loading skipped, for the log."""

    source: str
    kept: int = 0
    skipped_lines: list[int] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)

    def skip(self, line: int, reason: str) -> None:
        self.skipped_lines.append(line)
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def summary(self) -> str:
        text = f"{self.source}: {self.kept} records"
        if self.skipped_lines:
            first = ", ".join(map(str, self.skipped_lines[:5]))
            why = "; ".join(f"{n} {r}" for r, n in self.reasons.items())
            text += f", skipped {len(self.skipped_lines)} malformed ({why}; first at line {first})"
        return text


def _bad(report: LoadReport, strict: bool, line: int, reason: str) -> None:
    if strict:
        raise StepwiseError(f"{report.source}:{line}: {reason}")
    report.skip(line, reason)


def _normalise(row: dict) -> tuple[list[dict] | None, str]:
    """(messages, "") for a good row, or (None, reason)."""
    if "messages" in row and row["messages"] is not None:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            return None, "messages is not a non-empty list"
        out = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
                "system", "user", "assistant"):
                return None, "message without a string content and a system/user/assistant role"
            out.append({"role": m["role"], "content": m["content"]})
    elif "conversations" in row and row["conversations"] is not None:
        out = []
        for m in row["conversations"] or []:
            role = SHAREGPT_ROLES.get(m.get("from")) if isinstance(m, dict) else None
            if role is None or not isinstance(m.get("value"), str):
                return None, "conversation turn without a known 'from' and a string 'value'"
            out.append({"role": role, "content": m["value"]})
    else:
        instruction, output, input_text = row.get("instruction"), row.get("output"), row.get("input")
        if not isinstance(instruction, str) or not instruction.strip():
            return None, "missing or non-string instruction"
        if not isinstance(output, str):
            return None, "missing or non-string output"
        if input_text is not None and not isinstance(input_text, str):
            return None, "non-string input"
        out = [
            {"role": "user", "content": prompt_text(instruction, input_text or "")},
            {"role": "assistant", "content": output},
        ]
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        return None, "empty output"
    return out, ""


def _scan_json(path: Path, report: LoadReport, strict: bool) -> tuple[list[dict], list[int]] | None:
    """Check a JSON / JSON Lines file record by record, since `datasets` can report neither a line
    number nor a field of the wrong type (it casts or drops it). Returns the good rows and their lines
    when something was wrong, else None so the clean file goes through `datasets` and its cache.
    In a JSON array the "line" is the record's position (1-based)."""
    rows, lines, clean = [], [], True
    numbered = []  # (line, row, why it is malformed when that is known before looking at its fields)
    if _is_jsonl(path):
        with path.open(encoding="utf-8", errors="surrogateescape") as fh:
            for number, text in enumerate(fh, start=1):
                if not text.strip():
                    continue
                if BAD_BYTE.search(text):
                    numbered.append((number, None, NOT_UTF8))
                    continue
                try:
                    numbered.append((number, json.loads(text), None))
                except json.JSONDecodeError:
                    numbered.append((number, None, "invalid JSON line"))
    else:
        text = path.read_bytes().decode("utf-8", errors="surrogateescape")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            if BAD_BYTE.match(text, err.pos):
                raise StepwiseError(f"{path}:{err.lineno}: {NOT_UTF8} (byte 0x{ord(text[err.pos]) - 0xDC00:02x})") from None
            raise StepwiseError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
        if not isinstance(data, list):
            raise StepwiseError(f"{path}: expected a JSON array of records or JSON Lines")
        bad = BAD_BYTE.search(text) is not None
        numbered = [(n, row, NOT_UTF8 if bad and _has_bad_bytes(row) else None) for n, row in enumerate(data, start=1)]
    if not numbered:
        raise StepwiseError(f"{path}: no records (the file is empty)")
    for number, row, why in numbered:
        reason = why or ("invalid JSON line" if not isinstance(row, dict) else _normalise(row)[1])
        if reason:
            clean = False
            _bad(report, strict, number, reason)
            continue
        rows.append(row)
        lines.append(number)
    return None if clean else (rows, lines)


def _has_bad_bytes(value) -> bool:
    """Whether a parsed JSON value holds a string (or key) with a byte that was not UTF-8."""
    if isinstance(value, str):
        return BAD_BYTE.search(value) is not None
    if isinstance(value, dict):
        return any(_has_bad_bytes(k) or _has_bad_bytes(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_bad_bytes(v) for v in value)
    return False


def _is_jsonl(path: Path) -> bool:
    if path.suffix.lower() == ".jsonl":
        return True
    with path.open(encoding="utf-8", errors="replace") as fh:
        return fh.read(4096).lstrip()[:1] == "{"


def _is_utf8(path: Path) -> bool:
    decoder = codecs.getincrementaldecoder("utf-8")()
    with path.open("rb") as fh:
        try:
            while chunk := fh.read(1 << 20):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return False
    return True


def _read_csv_with_bad_bytes(path: Path) -> list[dict]:
    """The rows of a CSV file that is not all UTF-8, read by pandas (as `datasets` reads CSV), so
    the rows with bad bytes can be skipped like any malformed record. Every cell, the header too, is
    read as text (pandas' Arrow strings cannot hold the stand-ins for bad bytes); an empty cell is
    None, as in `datasets`."""
    import pandas as pd

    try:
        frame = pd.read_csv(path, header=None, dtype=object, encoding="utf-8", encoding_errors="surrogateescape")
    except (ValueError, pd.errors.ParserError) as err:  # EmptyDataError is a ValueError
        raise StepwiseError(f"{path}: could not load ({first_line(err)})") from None
    header = [str(name) for name in frame.iloc[0]]
    if any(BAD_BYTE.search(name) for name in header):
        raise StepwiseError(f"{path}:1: {NOT_UTF8} in the header; save the file as UTF-8")
    frame = frame.iloc[1:]
    frame.columns = header
    return frame.where(frame.notna(), None).to_dict("records")


def _root_cause(err: BaseException) -> BaseException:
    """The innermost exception behind a wrapper such as datasets' DatasetGenerationError ("An error
    occurred while generating the dataset"), which says nothing about the file or what was wrong."""
    seen = set()
    while (err.__cause__ or err.__context__) is not None and id(err) not in seen:
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return err


@contextlib.contextmanager
def _hub_offline():
    """datasets and huggingface_hub in offline mode for the block: a hub id is then looked up in
    the local cache at once, instead of after the hub client's retries (half a minute or more)."""
    import datasets
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = before


def _load_with_datasets(source: str, flag: str = "--dataset") -> tuple[list[dict], callable]:
    """Rows of a file or hub id via `datasets` (cached under HF_DATASETS_CACHE), and a row -> line map."""
    import datasets

    datasets.disable_progress_bars()  # our own log line reports the load
    path = Path(source)
    offline = None if path.exists() else hub_unreachable(offline=datasets.config.HF_HUB_OFFLINE)
    try:
        if path.exists():
            kind = FORMATS[path.suffix.lower()]
            if kind == "csv" and not _is_utf8(path):
                return _read_csv_with_bad_bytes(path), lambda i: i + 2  # line 1 is the header
            with held_logs("datasets"):
                ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        else:
            with held_logs("datasets"), _hub_offline() if offline else contextlib.nullcontext():
                ds = datasets.load_dataset(source, split="train")
    except StepwiseError:
        raise
    except Exception as err:  # datasets raises many types; the user needs one line
        if offline:
            raise offline_error(f"{flag} {source}", offline, "a local .json, .jsonl, .parquet or .csv file") from None
        if isinstance(err, datasets.exceptions.DatasetGenerationError):
            err = _root_cause(err)
        raise StepwiseError(f"{source}: could not load ({first_line(err)})") from None
    if path.suffix.lower() == ".csv":
        return ds.to_list(), lambda i: i + 2  # line 1 is the header
    return ds.to_list(), lambda i: i + 1  # JSON Lines lines (a clean file has no blank ones) or row numbers


def load_records(source: str, strict: bool = False, flag: str = "--dataset") -> tuple[list[dict], LoadReport]:
    """Normalised records of a file or hub dataset id, and what was skipped; flag names the option
    that gave it, in the errors about a hub id."""
    report = LoadReport(source)
    path = Path(source)
    if path.suffix and not path.exists() and ("/" in source or path.suffix.lower() in FORMATS):
        raise StepwiseError(f"{source}: no such file")
    if path.is_dir():
        raise StepwiseError(f"{source}: is a folder; give a .json, .jsonl, .parquet or .csv file")
    if path.exists():
        if path.suffix.lower() not in FORMATS:
            raise StepwiseError(f"{source}: unknown format (use .json, .jsonl, .parquet or .csv)")
    scanned = _scan_json(path, report, strict) if path.suffix.lower() in (".json", ".jsonl") else None
    if scanned is not None:
        rows, lines = scanned
        line_of = lines.__getitem__
    else:
        rows, line_of = _load_with_datasets(source, flag)
    records = []
    for i, row in enumerate(rows):
        messages, reason = (None, NOT_UTF8) if _has_bad_bytes(row) else _normalise(row)
        if messages is None:
            _bad(report, strict, line_of(i), reason)
            continue
        records.append({"messages": messages, "line": line_of(i)})
    report.kept = len(records)
    if not records:
        raise StepwiseError(f"{source}: no usable records ({report.summary()})")
    return records, report


def split_records(records: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded, deterministic train/val split: the same records land in val on every run.
    The val count rounds up, as `datasets`' train_test_split does (52,002 x 5% -> 2,601)."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = math.ceil(len(records) * val_fraction)
    val_ids = set(order[:n_val])
    train = [r for i, r in enumerate(records) if i not in val_ids]
    val = [r for i, r in enumerate(records) if i in val_ids]
    return train, val


def demo_records(n: int, seed: int) -> list[dict]:
    """The embedded default dataset (generated, no network), normalised like a file's."""
    from trainer.demo import dataset as demo_data

    rows = demo_data.build_records(n=n, seed=seed)
    return [{"messages": _normalise(row)[0], "line": i + 1} for i, row in enumerate(rows)]


def load_train_val(dataset: str, val_dataset: str | None, val_fraction: float, seed: int, strict: bool,
                   demo_n: int) -> tuple[list, list, list[LoadReport]]:
    """Train and validation records as the config asks, with the load reports."""
    if dataset == "demo":
        records, reports = demo_records(demo_n, seed), [LoadReport("demo", kept=demo_n)]
    else:
        records, report = load_records(dataset, strict)
        reports = [report]
    if val_dataset:
        val, report = load_records(val_dataset, strict, flag="--val_dataset")
        return records, val, reports + [report]
    train, val = split_records(records, val_fraction, seed)
    if not train:
        raise StepwiseError(f"--val_fraction {val_fraction} leaves none of the {len(records)} record(s) of {dataset} "
                            "for training")
    return train, val, reports
