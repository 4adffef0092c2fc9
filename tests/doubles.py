"""Test doubles for the front ends' interfaces."""

from __future__ import annotations

from collections.abc import Sequence

from app.chatio import ChatIO, PanelView, final_views


class ScriptedChatIO(ChatIO):
    """Reads from a list of lines and records everything shown: drives the REPL's loop in tests."""

    def __init__(self, lines: Sequence[str]):
        self.lines = list(lines)
        self.outputs: list[list[PanelView]] = []
        self.messages: list[str] = []
        self.errors: list[str] = []
        self.tables: list[tuple[str | None, list[str], list[list[str]]]] = []

    def prompt_for_input(self, prompt: str) -> str:
        if not self.lines:
            raise EOFError
        return self.lines.pop(0)

    def stream_output(self, updates):
        views = final_views(updates)
        self.outputs.append(views)
        return views

    def message(self, text: str) -> None:
        self.messages.append(text)

    def error(self, text: str) -> None:
        self.errors.append(text)

    def table(self, title, header, rows) -> None:
        self.tables.append((title, list(header), [list(r) for r in rows]))
