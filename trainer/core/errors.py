"""The one exception type for a user's mistake: the CLI prints it as a single line and exits 2."""

from __future__ import annotations


class StepwiseError(Exception):
    """A user's mistake (bad flag, file, line or checkpoint), reported as one line naming it."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (or its type's name): libraries raise multi-line
    messages (transformers' size tables, safetensors' reasons) that a one-line error quotes the head of."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
