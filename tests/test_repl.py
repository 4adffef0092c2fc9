"""The REPL (app/repl.py, app/repl_loop.py) over two real tiny checkpoints: through a pseudo-terminal
(Ctrl-C at many moments included), in-process with a scripted ChatIO (blind votes, the whole
conversation, settings and their cap), and `--spot-check` parsed as a script would.

The checkpoints are the demo Llama, each trained for a few steps to give one fixed answer, so what
the panels must show is known: step 10 says a lowercase line, step 20 an uppercase one, and the
IFEval checks tell them apart.
"""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app import repl
from app.repl import CommandCompleter, Repl
from app.repl_loop import run_selection
from app.session import CompareSession, ModelCache
from app.votes import Vote, VoteStore
from tests.doubles import InterruptingChatIO, ScriptedChatIO
from tests.support import ANSWERS, ROOT, copy_root, python_env
from trainer.core.catalog import CheckpointInfo, RunInfo
from trainer.inference.generate import GenerationSettings

HELDOUT = [
    {"key": "caps", "prompt": "answer in capitals", "instruction_id_list": ["change_case:english_capital"],
     "kwargs": [{}]},
    {"key": "short", "prompt": "what is two plus two?", "instruction_id_list": ["length_constraints:number_words"],
     "kwargs": [{"relation": "less than", "num_words": 5}]},
    {"key": "ref", "prompt": "hello", "reference": "the sea is very blue today", "answer": "The sea is very blue today."},
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


def _spawn(pexpect, ckpts, heldout):
    """`python -m app.repl` on a 60x160 pseudo-terminal. (pexpect answers no cursor-position requests,
    so prompt_toolkit is told not to send them.)"""
    return pexpect.spawn(sys.executable, ["-m", "app.repl", *_paths(ckpts), "--prompts", str(heldout),
                                          "--max_new_tokens", "16"],
                         cwd=str(ROOT), env={**_env(), "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1"},
                         dimensions=(60, 160), encoding="utf-8", timeout=60)


def test_pty_session(ckpts, heldout):
    """A person at a terminal: two panels answer, /heldout scores, a typo is one line, /quit is 0."""
    pexpect = pytest.importorskip("pexpect")
    child = _spawn(pexpect, ckpts, heldout)
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


def test_ctrl_c_at_any_moment_around_an_answer_leaves_the_session_alive(ckpts, heldout):
    """Ctrl-C pressed as an answer ends and the prompt redraws used to end the session (exit 130, or
    prompt_toolkit's "Application is already running") about once in 120 presses. Here: 40 presses at
    seeded moments from the middle of an answer to past its end, each second one a few milliseconds
    after the first (the first stops the answer, the second lands in the redraw), within ~30 s; then
    the REPL must still answer, and only /quit ends it, with 0."""
    pexpect = pytest.importorskip("pexpect")
    child = _spawn(pexpect, ckpts, heldout)
    rng = random.Random(13)
    presses, died = 0, None
    try:
        child.expect_exact("you>")
        started = time.monotonic()
        child.sendline("hello")
        child.expect_exact("tok/s")  # the answer's last frame (a prompt_toolkit redraw also shows "you>")
        child.expect_exact("you>")
        answer = time.monotonic() - started
        deadline = time.monotonic() + 30
        while presses < 40 and time.monotonic() < deadline:
            child.sendline("hello")
            time.sleep(rng.uniform(0.3, 1.3) * answer)
            child.sendcontrol("c")
            time.sleep(rng.uniform(0.0, 0.05))
            child.sendcontrol("c")
            presses += 2
            try:  # let the answer end and the prompt settle: until nothing more is written for 0.3 s
                while child.expect([pexpect.TIMEOUT, r"[\s\S]+"], timeout=0.3) == 1:
                    pass
            except pexpect.EOF:
                died = presses
                break
        assert died is None, f"the REPL ended after {died} presses: {child.before[-800:]!r}"
        assert presses >= 20
        child.sendline("/reset")
        child.expect_exact("histories cleared")
        child.sendline("say something")
        child.expect(r"alpha beta gamma delta\..*THE SEA IS VERY BLUE TODAY\.")
        child.expect_exact("you>")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before
    assert "Traceback" not in (child.before or "")


def test_ctrl_c_at_every_call_in_process(session, ckpts, heldout):
    """A real SIGINT at every moment the loop hands its ChatIO (reading a line, each panel update, each
    message, error and table): an answer stops and is kept, a command that is working ends with one
    line, the prompt ignores it, and the loop runs to the end of its lines."""
    session.reset()
    io = InterruptingChatIO(["hello", "/params", "answer in capitals", "/heldout 1", "/nope", "hello"])
    assert Repl(session, io, ckpts, str(heldout), seed=0).run() == 0
    assert io.sent >= 10
    assert [len(s.history) for s in session.sides] == [6, 6]  # three turns, each answer kept, stopped or not
    assert len(io.outputs) == 4  # three chat turns and one held-out prompt, each to its end or stopped
    assert all("tok/s" in v.subtitle for out in io.outputs for v in out)
    assert any("stopped" in v.subtitle for out in io.outputs for v in out)
    assert all(e in ("interrupted", "unknown command /nope (/help lists the commands)") for e in io.errors), io.errors


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
    assert float(early["task_accuracy"]) == 0.0 and float(late["task_accuracy"]) == 1.0  # one prompt has an answer
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


NOT_FINITE = ["temperature=nan", "temperature=inf", "top_p=nan", "top_p=inf", "repetition_penalty=nan",
              "repetition_penalty=-inf", "top_k=nan", "seed=inf", "max_new_tokens=inf", "max_new_tokens=nan"]


def test_params_not_finite_are_one_line_and_the_repl_answers_after(session, ckpts, heldout):
    r, io = _run(session, ckpts, heldout, [*(f"/params {p}" for p in NOT_FINITE), "hello"])
    assert len(io.errors) == len(NOT_FINITE), io.errors
    for pair, err in zip(NOT_FINITE, io.errors):
        assert err.startswith(f"/params: {pair.partition('=')[0]} must be") and "\n" not in err, (pair, err)
    assert session.settings == GenerationSettings(max_new_tokens=16)  # nothing half applied
    assert [v.body for v in io.outputs[-1]] == [ANSWERS[10], ANSWERS[20]]


def test_params_hold_max_new_tokens_to_the_cap(session, ckpts, heldout):
    session.reset()
    io = ScriptedChatIO(["/params max_new_tokens=1000 temperature=0.5", "/params max_new_tokens=24"])
    Repl(session, io, ckpts, str(heldout), max_new_tokens=32).run()
    assert io.errors == []
    capped = [m for m in io.messages if "cap" in m]
    assert len(capped) == 1 and "\n" not in capped[0] and "1000" in capped[0] and "32" in capped[0]
    assert "max_new_tokens=32  temperature=0.5" in io.messages[2]
    assert session.settings.max_new_tokens == 24  # below the cap: as asked
    session.settings = GenerationSettings(max_new_tokens=16)


def test_cli_max_new_tokens_is_the_cap_and_the_start(ckpts, capsys):
    args = repl.parse_args([])
    assert args.max_new_tokens is None  # no flag: start at 128, capped at 512 as the web app
    session = CompareSession(_paths(ckpts)[:1], settings=GenerationSettings(max_new_tokens=4))
    io = ScriptedChatIO(["/params max_new_tokens=513", "/params max_new_tokens=512"])
    Repl(session, io, ckpts, "none.jsonl").run()
    assert sum("cap" in m for m in io.messages) == 1 and session.settings.max_new_tokens == 512
    assert repl.main([_paths(ckpts)[1], "--prompt", "hello", "--max_new_tokens", "3"]) == 0
    assert "--- turn 1 · 3 tok" in capsys.readouterr().out  # answers start at the cap given


@pytest.fixture
def vote_root(ckpts, tmp_path) -> Path:
    """A copy of the checkpoints: the votes file is written into its root."""
    return copy_root(ckpts, tmp_path / "root")


def _vote_repl(root, heldout, lines, seed=0):
    session = CompareSession([str(root / "tiny" / "step-000010"), str(root / "tiny" / "step-000020")],
                             settings=GenerationSettings(max_new_tokens=16))
    io = ScriptedChatIO(lines)
    r = Repl(session, io, root, str(heldout), seed=seed)
    assert r.run() == 0
    return r, io


def test_blind_votes_hide_titles_until_a_vote_then_reveal(vote_root, heldout):
    r, io = _vote_repl(vote_root, heldout, [
        "/vote A", "/blind", "hello", "/models", "/score caps", "/vote a", "/vote A", "answer in capitals",
        "/vote TIE", "/blind off"])
    assert io.errors[0].startswith("/vote: panel A has no answer")
    assert io.errors[1:] == ["/vote: A and B already have a vote for these answers"]
    blind_out = io.outputs[0]
    assert [v.title for v in blind_out] == ["A", "B"]
    order = {ANSWERS[10]: "tiny/step-000010", ANSWERS[20]: "tiny/step-000020"}
    a_id, b_id = (order[v.body] for v in blind_out)
    _, _, models = io.tables[0]
    assert [row[-1] for row in models] == ["", "", ""]  # /models does not say which panel holds which
    assert [row[0] for row in io.tables[1][2]] == ["A", "B"]  # nor does /score
    hidden = io.messages[:io.messages.index(next(m for m in io.messages if m.startswith("vote recorded")))]
    assert not any("step" in m for m in hidden), hidden
    revealed = next(m for m in io.messages if m.startswith("revealed"))
    assert f"A = tiny · {'step 10' if a_id.endswith('10') else 'step 20'}" in revealed
    assert all(v.title.startswith(("A · tiny · step", "B · tiny · step")) for v in io.outputs[1])

    lines = (vote_root / "votes.jsonl").read_text().splitlines()
    assert len(lines) == 2
    fields = {f.name for f in dataclasses.fields(Vote)}
    assert all(set(json.loads(line)) == fields for line in lines)  # nothing else: no user, host or path
    first, second = VoteStore(vote_root).read()
    assert (first.a, first.b, first.outcome, first.blind) == (a_id, b_id, "a", True)
    assert first.prompt == "hello" and first.answers == [v.body for v in blind_out]
    assert first.histories == [[{"role": "user", "content": "hello"}]] * 2
    assert first.settings["max_new_tokens"] == 16 and first.key == "ref"  # "hello" is a held-out prompt
    assert (second.outcome, second.blind, second.prompt, second.key) == ("tie", False, "answer in capitals", "caps")
    assert [len(h) for h in second.histories] == [3, 3] and second.histories[0][1]["content"] == first.answers[0]
    assert str(vote_root) not in "".join(lines)


def test_vote_names_the_pair_with_more_panels(vote_root, heldout):
    r, io = _vote_repl(vote_root, heldout, [
        f"/load {vote_root / 'tiny' / 'final'}", "hello", "/vote b", "/vote A A", "/vote E A", "/vote C A",
        "/vote bad B C", "/vote sideways"])
    assert io.errors[0].startswith("usage: /vote") and io.errors[1].startswith("usage: /vote")
    assert io.errors[2].startswith("/vote: 'E' is not a panel (A to C")
    assert io.errors[3] == "/vote: 'sideways' is not a panel (A to C, or 1 to 3)" and len(io.errors) == 4
    c_over_a, bad = VoteStore(vote_root).read()
    assert (c_over_a.a, c_over_a.b, c_over_a.outcome) == ("tiny/step-000010", "tiny/final", "b")
    assert (bad.a, bad.b, bad.outcome, bad.blind) == ("tiny/step-000020", "tiny/final", "both_bad", False)


def test_blind_order_is_shuffled_per_session(vote_root, heldout):
    orders = set()
    for seed in range(8):
        r, io = _vote_repl(vote_root, heldout, ["/blind on", "/reset"], seed=seed)
        assert r.hidden and [s.history for s in r.session.sides] == [[], []]
        orders.add(tuple(Path(s.path).name for s in r.session.sides))
    assert orders == {("step-000010", "step-000020"), ("step-000020", "step-000010")}
    r, io = _vote_repl(vote_root, heldout, ["/drop 2", "/blind"])
    assert io.errors == ["/blind: load at least two panels to compare (/load)"]


def test_history_shows_the_whole_conversation(session, ckpts, heldout):
    r, io = _run(session, ckpts, heldout, ["hello", "/history", "answer in capitals", "/history off", "describe a cat",
                                           "/help"])
    assert [v.conversation for v in io.outputs[0]] == [[], []]
    for v, answer in zip(io.outputs[1], (ANSWERS[10], ANSWERS[20])):
        assert v.conversation == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": answer},
                                  {"role": "user", "content": "answer in capitals"}]
        assert v.body == answer
    assert [v.conversation for v in io.outputs[2]] == [[], []]
    assert "history on: panels show the whole conversation" in io.messages
    help_lines = io.messages[-1].splitlines()
    assert [line.split()[0] for line in help_lines] == [
        "/models", "/load", "/drop", "/params", "/heldout", "/score", "/history", "/blind", "/vote", "/reset", "/save",
        "/help", "/quit"]


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
             *([*_paths(ckpts), flag, value] for flag, value in [
                 ("--temperature", "nan"), ("--temperature", "inf"), ("--top_p", "nan"),
                 ("--repetition_penalty", "inf"), ("--top_k", "nan"), ("--max_new_tokens", "0"),
                 ("--max_new_tokens", "inf"), ("--seed", "nan")]),
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
    assert complete("/vo") == ["/vote"] and complete("/bl") == ["/blind"] and complete("/hi") == ["/history"]
    assert complete("/vote ") == ["A", "B", "tie", "bad"] and complete("/vote t") == ["tie"]
    assert complete("/vote a") == ["A"] and complete("/blind o") == ["on", "off"]
