"""How the REPL talks to a person: a rich terminal or plain lines (tests/doubles.py has a scripted one).

The loop in app/repl.py owns the histories and the commands; a ChatIO only reads a line, shows panels
while they stream, and prints messages and tables (the split of FastChat's serve/inference.py and
serve/cli.py). Panels arrive as PanelView lists so this module knows nothing of models or sessions.
"""

from __future__ import annotations

import abc
import contextlib
import io
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Below this many columns per panel the answers wrap into slivers, so panels stack instead.
MIN_PANEL_WIDTH = 38


@dataclass
class PanelView:
    """What one checkpoint's panel shows at one moment."""

    title: str
    """Run, step and val loss of the checkpoint."""
    body: str
    """The answer so far (or an error)."""
    subtitle: str = ""
    """Tokens, speed, stop reason, check results."""
    failed: bool = False
    """The side raised an error: drawn in red."""


class ChatIO(abc.ABC):
    @abc.abstractmethod
    def prompt_for_input(self, prompt: str) -> str:
        """The next line typed; EOFError when input ends."""

    @abc.abstractmethod
    def stream_output(self, updates: Iterable[list[PanelView]]) -> list[PanelView]:
        """Show the panels as they change; return the last state."""

    @abc.abstractmethod
    def message(self, text: str) -> None:
        """An informational line or block."""

    @abc.abstractmethod
    def error(self, text: str) -> None:
        """One line saying what went wrong; the loop goes on."""

    @abc.abstractmethod
    def table(self, title: str | None, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        """A table of already formatted cells."""


_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F] if chr(c) not in "\n\t"}


def printable(text: str) -> str:
    """Model output with control characters escaped: a stray ESC or backspace from an undertrained
    checkpoint must not move the cursor or restyle the terminal."""
    return text.translate(_CONTROL)


def final_views(updates: Iterable[list[PanelView]]) -> list[PanelView]:
    """The last state of a stream of panel updates (none: no panels), for a ChatIO that does not animate."""
    views: list[PanelView] = []
    for views in updates:
        pass
    return views


class PlainChatIO(ChatIO):
    """Plain lines for pipes and logs: panels are printed once they are complete, tables as TSV."""

    def __init__(self, out=None, err=None):
        self.out = out or sys.stdout
        self.err = err or sys.stderr

    def prompt_for_input(self, prompt: str) -> str:
        typed = sys.stdin.isatty()
        if typed:
            self.out.write(prompt)
            self.out.flush()
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        line = line.rstrip("\n")
        if not typed:  # piped input is not echoed by a terminal: show what was asked, for the log
            print(f"{prompt}{line}", file=self.out, flush=True)
        return line

    def stream_output(self, updates: Iterable[list[PanelView]]) -> list[PanelView]:
        views = final_views(updates)
        for v in views:
            print(f"=== {v.title}{' (error)' if v.failed else ''}", file=self.out)
            print(printable(v.body), file=self.out)
            if v.subtitle:
                print(f"--- {v.subtitle}", file=self.out)
        self.out.flush()
        return views

    def message(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def error(self, text: str) -> None:
        print(f"error: {text}", file=self.err, flush=True)

    def table(self, title, header, rows) -> None:
        if title:
            print(f"# {title}", file=self.out)
        for row in [header, *rows]:
            print("\t".join(str(c).replace("\t", " ") for c in row), file=self.out)
        self.out.flush()


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return cell in ("", "-")
    return True


def panels_renderable(views: Sequence[PanelView], width: int):
    """Panels side by side in equal columns, or stacked when the terminal is too narrow."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    panels = [
        Panel(Text(printable(v.body) or "…", style="red" if v.failed else ""), title=Text(v.title, style="bold"),
              subtitle=Text(v.subtitle, style="dim") if v.subtitle else None,
              border_style="red" if v.failed else "cyan", title_align="left", subtitle_align="right")
        for v in views
    ]
    if len(panels) > 1 and width >= MIN_PANEL_WIDTH * len(panels):
        grid = Table.grid(expand=True, padding=(0, 1))
        for _ in panels:
            grid.add_column(ratio=1, overflow="fold")  # long unbroken answers wrap, as when stacked
        grid.add_row(*panels)
        return grid
    return Group(*panels)


@contextlib.contextmanager
def _no_echo():
    """Keys typed (or ^C) while panels stream would be echoed into the live display and shift it by a
    line; with echo off they are not shown, and typed text still waits for the next prompt."""
    try:
        import termios

        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd) if os.isatty(fd) else None
    except (ImportError, OSError, ValueError, io.UnsupportedOperation):  # no termios, or stdin replaced
        saved = None
    if saved is None:
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~(termios.ECHO | getattr(termios, "ECHOCTL", 0))
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


class RichChatIO(ChatIO):
    """A terminal: prompt_toolkit input with completion and history, rich Live panels and tables."""

    def __init__(self, completer=None, console=None):
        from rich.console import Console

        self.console = console or Console(highlight=False)
        self._completer = completer
        self._session = None  # made on first use: building one checks that stdin is a terminal

    def prompt_for_input(self, prompt: str) -> str:
        if not sys.stdin.isatty():  # piped into a terminal's output: no line editor to run
            return PlainChatIO(self.console.file).prompt_for_input(prompt)
        from prompt_toolkit import PromptSession
        from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
        from prompt_toolkit.history import InMemoryHistory

        if self._session is None:
            self._session = PromptSession(history=InMemoryHistory(), completer=self._completer,
                                          auto_suggest=AutoSuggestFromHistory(), complete_while_typing=False)
        return self._session.prompt(prompt)

    def stream_output(self, updates):
        from rich.live import Live

        views: list[PanelView] = []
        # The renderable is rebuilt per update (not per refresh) so the width is read as it is now.
        with _no_echo(), Live(console=self.console, refresh_per_second=10, transient=False) as live:
            for views in updates:
                live.update(panels_renderable(views, self.console.width))
        if not self.console.is_terminal:  # Live ends its last frame with a newline only on a terminal
            self.console.line()
        return views

    def message(self, text: str) -> None:
        self.console.print(text, markup=False)

    def error(self, text: str) -> None:
        from rich.text import Text

        self.console.print(Text(f"error: {text}", style="bold red"), soft_wrap=True)

    def table(self, title, header, rows) -> None:
        from rich.table import Table

        t = Table(title=title, title_justify="left")
        for i, name in enumerate(header):
            numeric = all(_is_number(str(r[i])) for r in rows)
            # The first column names the row: kept on one line, the numbers' headers wrap instead.
            t.add_column(name, justify="right" if numeric and rows else "left", overflow="fold", no_wrap=i == 0)
        for row in rows:
            t.add_row(*[str(c) for c in row])
        self.console.print(t)
