"""The REPL (app/repl.py, app/repl_loop.py) over two real tiny checkpoints: through a pseudo-terminal,
in-process with a scripted ChatIO, and `--spot-check` parsed as a script would.

The checkpoints are the demo Llama, each trained for a few steps to give one fixed answer, so what
the panels must show is known: step 10 says a lowercase line, step 20 an uppercase one, and the
IFEval checks tell them apart.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from app import repl
from app.repl_loop import CommandCompleter, Repl, run_selection
from app.session import CompareSession, ModelCache
from tests.doubles import ScriptedChatIO
from tests.support import ANSWERS, ROOT, python_env
from trainer.core.catalog import CheckpointInfo, RunInfo
from trainer.inference.generate import GenerationSettings

HELDOUT = [
    {"key": "caps", "prompt": "answer in capitals", "instruction_id_list": ["change_case:english_capital"],
     "kwargs": [{}]},
    {"key": "short", "prompt": "what is two plus two?", "instruction_id_list": ["length_constraints:number_words"],
     "kwargs": [{"relation": "less than", "num_words": 5}]},
    {"key": "ref", "prompt": "hello", "reference": "the sea is very blue today"},
]


@pytest.fixture(scope="module")
def ckpts(answers_root) -> Path:
    """conftest's answers_root: root/tiny/{step-000010, step-000020, final (= step 20)}."""
    return answers_root


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("repl") / "heldout.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in HELDOUT))
    return path


def _paths(root: Path) -> list[str]:
    return [str(root / "tiny" / "step-000010"), str(root / "tiny" / "step-000020")]


def _env() -> dict:
    return python_env(PYTHONUNBUFFERED="1")


def test_pty_session(ckpts, heldout):
    """A person at a terminal: two panels answer, /heldout scores, a typo is one line, /quit is 0.
    (pexpect answers no cursor-position requests, so prompt_toolkit is told not to send them.)"""
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "app.repl", *_paths(ckpts), "--prompts", str(heldout),
                                           "--max_new_tokens", "16"],
                          cwd=str(ROOT), env={**_env(), "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1"}, dimensions=(60, 160), encoding="utf-8",
                          timeout=60)
    try:
        child.expect_exact("you>")
        child.sendline("hello")
        # Side by side: both titles on one line, then both answers on the next.
        child.expect(r"\[1\] tiny · step 10 · val 2\.500.*\[2\] tiny · step 20 · val 1\.250")
        child.expect(r"alpha beta gamma delta\..*THE SEA IS VERY BLUE TODAY\.")
        child.expect_exact("you>")
        child.sendline("/heldout 2")
        child.expect("held-out scores")
        child.expect_exact("rougeL")
        child.expect_exact("[1] tiny · step 10")
        child.expect_exact("[2] tiny · step 20")
        child.expect_exact("you>")
        child.sendline("/nope")
        child.expect(r"error: unknown command /nope[^\n]*\r\n")
        child.expect_exact("you>")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before


def test_spot_check_is_parseable(ckpts, heldout):
    proc = subprocess.run([sys.executable, "-m", "app.repl", *_paths(ckpts), "--spot-check", "3",
                           "--prompts", str(heldout), "--max_new_tokens", "16"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = lines[0].split("\t")
    assert header == list(repl.SPOT_HEADER)
    rows = {r["checkpoint"]: r for r in (dict(zip(header, line.split("\t"))) for line in lines[1:])}
    assert list(rows) == ["tiny/step-000010", "tiny/step-000020"]
    early, late = rows["tiny/step-000010"], rows["tiny/step-000020"]
    assert (early["step"], early["val_loss"], early["n"]) == ("10", "2.5000", "3")
    # Each passes one of the two checks: caps for step 20, "fewer than 5 words" for step 10.
    assert float(early["if_inst_strict"]) == float(late["if_inst_strict"]) == 0.5
    assert float(early["rougeL"]) == 0.0 and float(late["rougeL"]) == 1.0
    assert float(late["eos_rate"]) == 1.0
    assert late["path"].endswith("step-000020")


@pytest.fixture(scope="module")
def session(ckpts):
    return CompareSession(_paths(ckpts), settings=GenerationSettings(max_new_tokens=16))


def _run(session, ckpts, heldout, lines):
    session.reset()
    io = ScriptedChatIO(lines)
    r = Repl(session, io, ckpts, str(heldout), seed=0)
    assert r.run() == 0
    return r, io


def test_chat_history_score_and_save(session, ckpts, heldout, tmp_path):
    r, io = _run(session, ckpts, heldout, [
        "hello", "answer in capitals", "/score", "/score change_case:english_lowercase",
        '/score length_constraints:number_words relation="less than" num_words=5',
        "/score length_constraints:number_words", f"/save {tmp_path / 't.json'}", f"/save {tmp_path / 't.md'}"])
    assert [v.body for v in io.outputs[0]] == [ANSWERS[10], ANSWERS[20]]
    assert all(len(s.history) == 4 for s in session.sides)  # two turns each
    assert io.outputs[1][0].subtitle.startswith("turn 2")
    (_, header, rows), (_, _, lower_rows), (_, _, short_rows) = io.tables
    assert [row[1] for row in rows] == ["✗", "✓"]  # only step 20 answered in capitals
    assert lower_rows[1][1] == "✗"
    assert [row[1] for row in short_rows] == ["✓", "✗"]  # 4 words and 6 words
    assert io.errors == ["/score: length_constraints:number_words needs kwargs num_words, relation"]
    saved = json.loads((tmp_path / "t.json").read_text())
    assert [m["content"] for m in saved["panels"][1]["history"]] == ["hello", ANSWERS[20], "answer in capitals",
                                                                       ANSWERS[20]]
    assert saved["settings"]["max_new_tokens"] == 16
    assert ANSWERS[10] in (tmp_path / "t.md").read_text()


def test_heldout_table(session, ckpts, heldout):
    r, io = _run(session, ckpts, heldout, ["/heldout 3"])
    assert len(io.outputs) == 3
    (title, header, rows), = io.tables
    assert header[:3] == ["checkpoint", "n", "if_prompt_strict"]
    assert [row[1] for row in rows] == ["3", "3"]
    assert rows[0][header.index("rougeL")] == "0.000" and rows[1][header.index("rougeL")] == "1.000"
    caps = next(out for out in io.outputs if "english_capital" in out[0].body)
    assert "✗ change_case:english_capital" in caps[0].body and "✓ change_case:english_capital" in caps[1].body
    assert all(s.history == [] for s in session.sides)  # held-out prompts leave the chat alone


def test_mistakes_are_one_line_and_the_loop_goes_on(session, ckpts, heldout):
    r, io = _run(session, ckpts, heldout, [
        "/frobnicate", "/load /no/such/ckpt", "/drop 7", "/params temperature=-1", "/params top_k=many",
        "/params color=blue", "/heldout zero", "/score", "/load 1", "/drop 3", "/params temperature=0.5 seed=none",
        "/reset"])
    assert len(io.errors) == 8, io.errors
    assert all("\n" not in e for e in io.errors)
    assert "unknown command /frobnicate" in io.errors[0]
    assert "/no/such/ckpt" in io.errors[1]
    assert "temperature" in io.errors[3]
    assert len(session.sides) == 2  # /load 1 added step 10 as panel 3, /drop 3 took it away
    assert session.settings.temperature == 0.5 and session.settings.seed is None
    session.settings = GenerationSettings(max_new_tokens=16)


def test_load_keeps_every_panel_in_the_cache(ckpts, heldout):
    """Every turn uses every panel: a cache budget below their sum would reload models each prompt."""
    session = CompareSession(cache=ModelCache(budget_bytes=1))
    io = ScriptedChatIO([f"/load {p}" for p in [*_paths(ckpts), ckpts / "tiny" / "final"]])
    Repl(session, io, ckpts, str(heldout)).run()
    assert io.errors == [] and len(session.sides) == 3
    assert all(s.path in session.cache for s in session.sides)


def test_cli_mistakes_exit_2_with_one_line(ckpts, tmp_path, capsys):
    cases = [[str(tmp_path / "missing")], ["--root", str(tmp_path)], [*_paths(ckpts), "--spot-check", "0"],
             [*_paths(ckpts), "--temperature", "-2"], ["--bogus-flag"],
             [*_paths(ckpts), "--spot-check", "2", "--prompts", str(tmp_path / "none.jsonl")]]
    for argv in cases:
        try:
            code = repl.main(argv)
        except SystemExit as exit_:
            code = exit_.code
        err = capsys.readouterr().err
        assert code == 2, argv
        assert err.count("\n") == 1 and err.startswith("error: "), (argv, err)


def test_prompt_once_plain(ckpts, capsys):
    assert repl.main(["--root", str(ckpts), "--prompt", "hello", "--max_new_tokens", "16"]) == 0
    out = capsys.readouterr().out
    # No CKPT: the newest run, step 10 and final/ (step 20 is the same weights as final/).
    assert "=== [1] tiny · step 10 · val 2.500\nalpha beta gamma delta.\n" in out
    assert "=== [2] tiny · final (step 20) · val 1.250\nTHE SEA IS VERY BLUE TODAY.\n" in out
    assert "step-000020" not in out and "step 20 · val" not in out


def test_run_selection_spreads_and_keeps_final(tmp_path):
    steps = [CheckpointInfo(tmp_path / f"step-{s:06d}", "r", s) for s in range(100, 1100, 100)]
    final = CheckpointInfo(tmp_path / "final", "r", 700, is_final=True)
    picked = run_selection(RunInfo(tmp_path, "r", steps + [final], {}))
    assert [p.name for p in picked] == ["step-000100", "step-000500", "step-001000", "final"]
    assert run_selection(RunInfo(tmp_path, "r", steps[:2], {})) == [s.path for s in steps[:2]]


def test_completion_offers_commands_checkpoints_and_settings(session, ckpts, heldout):
    from prompt_toolkit.document import Document

    completer = CommandCompleter(Repl(session, ScriptedChatIO([]), ckpts, str(heldout)))

    def complete(text):
        return [c.text for c in completer.get_completions(Document(text), None)]

    assert complete("/lo") == ["/load"]
    assert complete("/load tiny/") == ["tiny/step-000010", "tiny/step-000020", "tiny/final"]
    assert complete("/params temp") == ["temperature="]
    assert complete("/score ca") == ["caps"]
    assert complete("hello /lo") == []
