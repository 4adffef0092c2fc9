"""What the REPL and the web app share about choosing checkpoints from a catalogue and showing their
numbers: an even spread of a run's checkpoints, a kept-or-first choice, a checkpoint's short id, and
one way to print a value. A checkpoint's label for people is trainer.core.catalog's."""

from __future__ import annotations

from pathlib import Path


def checkpoint_id(path: str | Path) -> str:
    """`run/step-000500`: the folder and its run's name. Unlike the label it is an id: /load takes it,
    and a script reading the plain spot-check table can split it."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}"


def spread(items: list, k: int) -> list:
    """k items evenly spaced from first to last (all of them when there are no more than k)."""
    if len(items) <= k:
        return list(items)
    if k <= 1:
        return items[-1:] if k == 1 else []
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)]


def keep_choice(choices: list, current):
    """current while it is still one of choices, else the first choice (None when there are none)."""
    return current if current in choices else (choices[0] if choices else None)


def fmt(value, digits: int = 4, missing: str = "nan") -> str:
    """A float with `digits` decimals, None as `missing`, anything else as str()."""
    if value is None:
        return missing
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def round_value(value, digits: int = 4):
    """Floats rounded for a table cell; other values (None, ints, text) as they are."""
    return round(value, digits) if isinstance(value, float) else value
