"""The chat-IO versions on their own: layout, plain formats, escaping, the scripted reader."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from app.chatio import (
    PanelView,
    PlainChatIO,
    RichChatIO,
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
