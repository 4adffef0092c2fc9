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


class InterruptingChatIO(ScriptedChatIO):
    """A ScriptedChatIO that sends the process SIGINT (a real Ctrl-C, as the terminal sends it) at every
    moment the loop hands it: asking for a line, each panel update, each message, error and table. It
    only does so while the REPL's own handler (app.chatio.CtrlC) is installed: without it the signal
    would interrupt pytest itself."""

    def __init__(self, lines: Sequence[str]):
        super().__init__(lines)
        self.sent = 0

    def ctrl_c(self) -> None:
        import os
        import signal

        from app.chatio import CtrlC

        if isinstance(signal.getsignal(signal.SIGINT), CtrlC):
            self.sent += 1
            os.kill(os.getpid(), signal.SIGINT)

    def prompt_for_input(self, prompt: str) -> str:
        self.ctrl_c()
        return super().prompt_for_input(prompt)

    def stream_output(self, updates):
        def interrupted():
            for views in updates:
                self.ctrl_c()
                yield views
        return super().stream_output(interrupted())

    def message(self, text: str) -> None:
        self.ctrl_c()
        super().message(text)

    def error(self, text: str) -> None:
        self.ctrl_c()
        super().error(text)

    def table(self, title, header, rows) -> None:
        self.ctrl_c()
        super().table(title, header, rows)
