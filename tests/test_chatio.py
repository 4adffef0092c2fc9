"""The chat-IO versions on their own: layout, plain formats, escaping, the whole conversation, what
Ctrl-C does, the scripted reader."""

from __future__ import annotations

import io
import signal

import pytest
from rich.console import Console

from app.chatio import (
    CtrlC,
    PanelView,
    PlainChatIO,
    RichChatIO,
    StopFlag,
    panels_renderable,
    printable,
)
from tests.doubles import ScriptedChatIO

UPDATES = [
    [PanelView("[1] run · step 10", "al"), PanelView("[2] run · step 20", "")],
    [PanelView("[1] run · step 10", "alpha beta", "6 tok"), PanelView("[2] run · step 20", "BLUE SEA", "8 tok")],
]


def _render(views, width: int) -> list[str]:
    console = Console(file=io.StringIO(), width=width, force_terminal=False, color_system=None)
    console.print(panels_renderable(views, width))
    return console.file.getvalue().splitlines()


def test_panels_side_by_side_when_wide_and_stacked_when_narrow():
    wide = _render(UPDATES[1], 120)
    assert len(wide) == 3  # top border, one line of text, bottom border
    assert "[1] run · step 10" in wide[0] and "[2] run · step 20" in wide[0]
    assert "alpha beta" in wide[1] and "BLUE SEA" in wide[1]
    narrow = _render(UPDATES[1], 60)
    assert len(narrow) == 6
    assert "[1] run · step 10" in narrow[0] and "[2] run · step 20" in narrow[3]
    assert all(len(line) <= 60 for line in narrow)


def test_rich_stream_ends_on_the_last_state():
    console = Console(file=io.StringIO(), width=100, force_terminal=False, color_system=None)
    last = RichChatIO(console=console).stream_output(iter(UPDATES))
    assert last is UPDATES[-1]
    out = console.file.getvalue()
    assert "alpha beta" in out and "BLUE SEA" in out and out.endswith("\n")


def test_plain_prints_final_panels_tables_and_one_line_errors():
    out, err = io.StringIO(), io.StringIO()
    plain = PlainChatIO(out, err)
    plain.stream_output(iter(UPDATES))
    plain.table(None, ["checkpoint", "score"], [["run/step-000010", "0.5\tx"]])
    plain.error("bad thing")
    assert out.getvalue() == ("=== [1] run · step 10\nalpha beta\n--- 6 tok\n"
                              "=== [2] run · step 20\nBLUE SEA\n--- 8 tok\n"
                              "checkpoint\tscore\nrun/step-000010\t0.5 x\n")
    assert err.getvalue() == "error: bad thing\n"


def test_failed_panel_is_marked():
    out = io.StringIO()
    PlainChatIO(out, io.StringIO()).stream_output([[PanelView("[1] x", "no weights", failed=True)]])
    assert out.getvalue().startswith("=== [1] x (error)\nno weights\n")


def test_control_characters_are_escaped_not_sent_to_the_terminal():
    assert printable("ok\x1b[31mred\x05\x7f\nnext\tcol") == "ok\\x1b[31mred\\x05\\x7f\nnext\tcol"
    lines = _render([PanelView("t", "a\x1b[2Jb")], 40)
    assert "\x1b" not in "".join(lines) and "a\\x1b[2Jb" in lines[1]


def test_scripted_reads_lines_then_ends():
    scripted = ScriptedChatIO(["hello", "/quit"])
    assert scripted.prompt_for_input("> ") == "hello"
    assert scripted.prompt_for_input("> ") == "/quit"
    with pytest.raises(EOFError):
        scripted.prompt_for_input("> ")
    scripted.stream_output(iter(UPDATES))
    assert scripted.outputs == [UPDATES[-1]]


CONVERSATION = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "alpha beta"},
                {"role": "user", "content": "again"}]


def test_a_panel_can_show_its_whole_conversation():
    out = io.StringIO()
    PlainChatIO(out, io.StringIO()).stream_output([[PanelView("[1] x", "gamma", "3 tok", conversation=CONVERSATION)]])
    assert out.getvalue() == "=== [1] x\nyou: hello\nalpha beta\nyou: again\ngamma\n--- 3 tok\n"
    lines = _render([PanelView("[1] x", "gamma", conversation=CONVERSATION), PanelView("[2] y", "DELTA")], 120)
    text = "\n".join(lines)
    assert text.index("you: hello") < text.index("alpha beta") < text.index("you: again") < text.index("gamma")
    assert "DELTA" in text


def test_while_streaming_a_long_conversation_keeps_its_end_in_view():
    """rich's Live cuts a frame taller than the terminal at the bottom, where the answer streams."""
    long = [{"role": r, "content": f"{r} line {k}"} for k in range(20) for r in ("user", "assistant")]
    views = [PanelView("[1] x", "the answer so far", conversation=long), PanelView("[2] y", "short")]
    console = Console(file=io.StringIO(), width=100, height=12, force_terminal=False, color_system=None)
    console.print(panels_renderable(views, 100, console, 12))
    frame = console.file.getvalue().splitlines()
    assert len(frame) <= 12 and "the answer so far" in frame[-2] and "…" in frame[1]
    assert "user line 0" not in "".join(frame) and "assistant line 19" in "".join(frame)
    whole = _render(views, 100)  # the last frame, after the stream: everything
    assert "user line 0" in "".join(whole) and len(whole) > 40


def test_ctrl_c_stops_an_answer_ends_a_command_and_is_ignored_elsewhere():
    ctrl_c, before = CtrlC(), signal.getsignal(signal.SIGINT)
    with ctrl_c.installed():
        assert signal.getsignal(signal.SIGINT) is ctrl_c
        signal.raise_signal(signal.SIGINT)  # at the prompt, or between steps: nothing happens
        stop = StopFlag()
        with ctrl_c.command(), ctrl_c.answering(stop):  # an answer inside a command: only the answer stops
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        assert stop.is_set()
        with pytest.raises(KeyboardInterrupt), ctrl_c.command():  # a command that is working ends
            signal.raise_signal(signal.SIGINT)
        with ctrl_c.command(interruptible=False):
            signal.raise_signal(signal.SIGINT)
        with ctrl_c.installed():  # nested: the same handler, still there after
            pass
        assert signal.getsignal(signal.SIGINT) is ctrl_c
    assert signal.getsignal(signal.SIGINT) is before
