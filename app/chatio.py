"""How the REPL talks to a person: a rich terminal or plain lines (tests/doubles.py has a scripted one).

The loop in app/repl_loop.py owns the histories and the commands; a ChatIO only reads a line, shows
panels while they stream, and prints messages and tables (the split of FastChat's serve/inference.py
and serve/cli.py). Panels arrive as PanelView lists so this module knows nothing of models or sessions.

What Ctrl-C does is decided here too (CtrlC), since it depends on the terminal's modes: at the line
editor the key is read as a key, everywhere else the terminal turns it into SIGINT.
"""

from __future__ import annotations

import abc
import contextlib
import io
import os
import signal
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

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
    conversation: list[dict] = field(default_factory=list)
    """Messages shown above the answer, oldest first, ending with the prompt it answers ({role, content});
    empty to show the answer alone."""


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


def conversation_lines(messages: list[dict]) -> list[str]:
    """A panel's earlier messages as plain lines: the person's turns after `you: `, answers as they are."""
    return [f"you: {printable(m['content'])}" if m.get("role") == "user" else printable(m["content"])
            for m in messages]


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
            for line in conversation_lines(v.conversation):
                print(line, file=self.out)
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


def panel_text(v: PanelView):
    """A panel's body as rich Text: the conversation (the person's turns in cyan, earlier answers dim),
    then the answer."""
    from rich.text import Text

    text = Text()
    for m in v.conversation:
        user = m.get("role") == "user"
        text.append(f"you: {printable(m['content'])}" if user else printable(m["content"]),
                    style="cyan" if user else "dim")
        text.append("\n\n")
    text.append(printable(v.body) or "…", style="red" if v.failed else "")
    return text


def tail(text, console, width: int, height: int):
    """The last `height` lines of text wrapped at `width` (the first shown as `…` when cut)."""
    from rich.text import Text

    lines = text.wrap(console, max(width, 1))
    if len(lines) <= height:
        return text
    kept = Text("…", style="dim")
    for line in lines[len(lines) - max(height - 1, 1):]:
        kept.append("\n")
        kept.append_text(line)
    return kept


def panels_renderable(views: Sequence[PanelView], width: int, console=None, height: int | None = None):
    """Panels side by side in equal columns, or stacked when the terminal is too narrow. With a console
    and a height (while answers stream), a panel showing a conversation keeps only what fits, its end:
    rich's Live cuts a frame taller than the terminal at the bottom, which would hide the answer."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    n = max(len(views), 1)
    side_by_side = n > 1 and width >= MIN_PANEL_WIDTH * n
    inner = (width - n + 1) // n - 4 if side_by_side else width - 4  # less borders, padding, gaps
    room = max(height - 3 if side_by_side else height // n - 2, 3) if console is not None and height else None
    panels = []
    for v in views:
        body = panel_text(v)
        if room is not None and v.conversation:
            body = tail(body, console, inner, room)
        panels.append(Panel(body, title=Text(v.title, style="bold"),
                            subtitle=Text(v.subtitle, style="dim") if v.subtitle else None,
                            border_style="red" if v.failed else "cyan", title_align="left", subtitle_align="right"))
    if side_by_side:
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
        # Ctrl-C at the line editor is a key (raw mode), read as KeyboardInterrupt from prompt(). SIGINT
        # stays with the caller's handler (CtrlC): prompt_toolkit's own one puts the default handler back
        # as it finishes, and a Ctrl-C in that moment interrupts its teardown.
        return self._session.prompt(prompt, handle_sigint=False)

    def stream_output(self, updates):
        from rich.live import Live

        views: list[PanelView] = []
        # The renderable is rebuilt per update (not per refresh) so the width is read as it is now.
        with _no_echo(), Live(console=self.console, refresh_per_second=10, transient=False) as live:
            for views in updates:
                live.update(panels_renderable(views, self.console.width, self.console, self.console.height))
            live.update(panels_renderable(views, self.console.width))  # the last frame whole
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


# --- Ctrl-C ----------------------------------------------------------------------------------------

class StopFlag:
    """A stop request set from a signal handler. Not a threading.Event: Event.set takes a lock, and a
    second SIGINT arriving while the handler is inside it would run the handler again there and wait
    on that lock forever. The generating threads only read it."""

    def __init__(self):
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


class CtrlC:
    """What SIGINT does at each moment of a REPL: while answers stream it stops them (every side ends
    after its current token and keeps what it said); while a command works (loading a model, scoring)
    it ends that command with KeyboardInterrupt; anywhere else (at the prompt, while a panel is drawn,
    between a prompt and its answer) it is ignored. So no Ctrl-C can end the session or leave the line
    editor half torn down: raising KeyboardInterrupt at an arbitrary moment is what did both.

    At the line editor itself Ctrl-C is not a signal (the terminal is in raw mode): prompt_toolkit
    reads the key and prompt() raises KeyboardInterrupt, which the loop takes as "clear the line"."""

    def __init__(self):
        self.stop: StopFlag | None = None
        self.raising = False
        self._depth = 0

    def __call__(self, signum, frame) -> None:
        if self.stop is not None:
            self.stop.set()
        elif self.raising:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self):
        """This handler for SIGINT inside the block (the main thread only; nested blocks reuse it)."""
        if self._depth or threading.current_thread() is not threading.main_thread():
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
            return
        previous = signal.signal(signal.SIGINT, self)
        self._depth += 1
        try:
            yield self
        finally:
            self._depth -= 1
            signal.signal(signal.SIGINT, previous)

    @contextlib.contextmanager
    def answering(self, stop: StopFlag):
        """Ctrl-C sets `stop` inside the block."""
        previous, self.stop = self.stop, stop
        try:
            yield stop
        finally:
            self.stop = previous

    @contextlib.contextmanager
    def command(self, interruptible: bool = True):
        """Ctrl-C raises KeyboardInterrupt inside the block (unless answering, or not interruptible)."""
        previous, self.raising = self.raising, interruptible
        try:
            yield
        finally:
            self.raising = previous
