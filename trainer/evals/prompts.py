"""Held-out prompt files: JSON Lines, a superset of Google's IFEval input_data.jsonl.
The schema is the README's "Held-out prompts and scores".

A line carries `prompt` and any of `key`, `instruction_id_list` + `kwargs` (IFEval or IFBench checks:
AllenAI's IFBench_test.jsonl uses the same schema and loads unchanged; each id picks its own
benchmark's checker), `reference` (ROUGE-L), `answer` (task accuracy: scoring.answer_correct) and
`category`. Every mistake is a StepwiseError naming
`file:line`, found at load time so that a long evaluation never dies on its last prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.core.errors import StepwiseError, first_line
from trainer.core.files import read_jsonl
from trainer.evals import registry


@dataclass
class HeldoutPrompt:
    key: str
    """Stable id: the file's `key`, or `line-N` when the line has none."""
    prompt: str
    """The full user message the model sees."""
    instruction_id_list: list[str] = field(default_factory=list)
    """IFEval or IFBench instruction ids checked on the response; empty for ROUGE-L-only prompts."""
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    """One dict of checker arguments per instruction id."""
    reference: str | None = None
    """Reference answer for ROUGE-L."""
    answer: str | None = None
    """The sentence a right answer states (task accuracy, scoring.answer_correct), whatever form the
    constraints give it."""
    category: str | None = None
    """Free-form group name (the demo data's base task), for per-category reports."""
    line: int = 0
    """1-based line in the file it came from."""


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _optional_str(row: dict[str, Any], name: str, where: str) -> str | None:
    value = row.get(name)
    if value is not None and not isinstance(value, str):
        raise StepwiseError(f"{where}: `{name}` must be a string, got {_short(value)}")
    return value or None


def check_instruction(instruction_id: str, kwargs: dict[str, Any], prompt: str, where: str) -> None:
    """A StepwiseError starting with `where` unless IFEval or IFBench knows the instruction id, every
    kwarg its checker needs is given (not None), and the checker accepts them: checked before any
    scoring."""
    if instruction_id not in registry.instruction_registry():
        raise StepwiseError(
            f"{where}: unknown instruction id {instruction_id!r} (not in IFEval's or IFBench's registry)")
    given = {k for k, v in kwargs.items() if v is not None}
    missing = [k for k in registry.required_kwargs(instruction_id) if k not in given]
    if missing:
        # Without them the checker would silently check against values it makes up.
        raise StepwiseError(f"{where}: {instruction_id} needs kwargs {', '.join(missing)}")
    try:
        registry.build_checker(instruction_id, kwargs, prompt)
    except Exception as err:  # the checkers raise TypeError, ValueError, KeyError, ... for bad kwargs
        raise StepwiseError(f"{where}: {instruction_id} rejects kwargs {_short(kwargs)}: {first_line(err)}") from None


def _instructions(row: dict[str, Any], where: str) -> tuple[list[str], list[dict[str, Any]]]:
    ids = row.get("instruction_id_list")
    if ids is None:
        ids = []
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise StepwiseError(f"{where}: `instruction_id_list` must be a list of strings, got {_short(ids)}")
    kwargs = row.get("kwargs")
    if kwargs is None:
        kwargs = [{} for _ in ids]  # checkers without arguments need no kwargs line
    if not isinstance(kwargs, list) or not all(isinstance(k, dict) for k in kwargs):
        raise StepwiseError(f"{where}: `kwargs` must be a list of objects (dicts), got {_short(kwargs)}")
    if len(kwargs) != len(ids):
        raise StepwiseError(
            f"{where}: `kwargs` has {len(kwargs)} entries for {len(ids)} instruction ids (one each, in order)"
        )
    for instruction_id, kw in zip(ids, kwargs):
        check_instruction(instruction_id, kw, row["prompt"], where)
    return ids, kwargs


def _parse(row: Any, line: int, where: str) -> HeldoutPrompt:
    if not isinstance(row, dict):
        raise StepwiseError(f"{where}: expected a JSON object, got {_short(row)}")
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise StepwiseError(f"{where}: missing or empty `prompt`")
    ids, kwargs = _instructions(row, where)
    key = row.get("key")
    return HeldoutPrompt(
        key=f"line-{line}" if key is None or key == "" else str(key),
        prompt=prompt,
        instruction_id_list=ids,
        kwargs=kwargs,
        reference=_optional_str(row, "reference", where),
        answer=_optional_str(row, "answer", where),
        category=_optional_str(row, "category", where),
        line=line,
    )


def load_prompts(path: str | Path) -> list[HeldoutPrompt]:
    """Read and validate a held-out prompt file. Blank lines are skipped."""
    path = Path(path)
    prompts: list[HeldoutPrompt] = []
    first_line_of_key: dict[str, int] = {}
    for line, where, row in read_jsonl(path, "prompt file"):
        p = _parse(row, line, where)
        if p.key in first_line_of_key:
            raise StepwiseError(f"{where}: duplicate key {p.key!r} (first on line {first_line_of_key[p.key]})")
        first_line_of_key[p.key] = line
        prompts.append(p)
    if not prompts:
        raise StepwiseError(f"{path}: no prompts in file")
    return prompts
