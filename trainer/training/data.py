"""Loading instruction data: files or hub ids through `datasets`, normalised to chat messages.

Every record becomes `{"messages": [{"role", "content"}, ...], "line": N}`: an Alpaca record is a user
turn (instruction, then input if any) and an assistant turn (output); `messages` records are taken as
they are; ShareGPT `conversations` (`from`/`value`) are renamed. Malformed records are skipped with a
count and their first line numbers, or rejected with `file:line` under `--strict`.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from trainer.core.chat import prompt_text
from trainer.core.errors import StepwiseError

FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
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
    if _is_jsonl(path):
        numbered = []
        with path.open(encoding="utf-8") as fh:
            for number, text in enumerate(fh, start=1):
                if text.strip():
                    try:
                        numbered.append((number, json.loads(text)))
                    except json.JSONDecodeError:
                        numbered.append((number, None))
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise StepwiseError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
        if not isinstance(data, list):
            raise StepwiseError(f"{path}: expected a JSON array of records or JSON Lines")
        numbered = list(enumerate(data, start=1))
    if not numbered:
        raise StepwiseError(f"{path}: no records (the file is empty)")
    for number, row in numbered:
        reason = "invalid JSON line" if not isinstance(row, dict) else _normalise(row)[1]
        if reason:
            clean = False
            _bad(report, strict, number, reason)
            continue
        rows.append(row)
        lines.append(number)
    return None if clean else (rows, lines)


def _is_jsonl(path: Path) -> bool:
    if path.suffix.lower() == ".jsonl":
        return True
    with path.open(encoding="utf-8") as fh:
        return fh.read(4096).lstrip()[:1] == "{"


def _load_with_datasets(source: str) -> tuple[list[dict], callable]:
    """Rows of a file or hub id via `datasets` (cached under HF_DATASETS_CACHE), and a row -> line map."""
    import datasets

    datasets.disable_progress_bars()  # our own log line reports the load
    path = Path(source)
    try:
        if path.exists():
            kind = FORMATS[path.suffix.lower()]
            ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        else:
            ds = datasets.load_dataset(source, split="train")
    except StepwiseError:
        raise
    except Exception as err:  # datasets raises many types; the user needs one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StepwiseError(f"{source}: could not load ({first})") from None
    if path.suffix.lower() == ".csv":
        return ds.to_list(), lambda i: i + 2  # line 1 is the header
    return ds.to_list(), lambda i: i + 1  # JSON Lines lines (a clean file has no blank ones) or row numbers


def load_records(source: str, strict: bool = False) -> tuple[list[dict], LoadReport]:
    """Normalised records of a file or hub dataset id, and what was skipped."""
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
        rows, line_of = _load_with_datasets(source)
    records = []
    for i, row in enumerate(rows):
        messages, reason = _normalise(row)
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
        val, report = load_records(val_dataset, strict)
        return records, val, reports + [report]
    train, val = split_records(records, val_fraction, seed)
    if not train:
        raise StepwiseError(f"--val_fraction {val_fraction} leaves none of the {len(records)} record(s) of {dataset} "
                            "for training")
    return train, val, reports
