"""`python -m trainer score`: end to end in a subprocess, and each bad responses file in-process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT, python_env
from trainer.cli import score as score_cmd
from trainer.core.errors import StepwiseError

PROMPTS = [
    {"key": "low", "prompt": "Say hello in lowercase.", "instruction_id_list": ["change_case:english_lowercase"],
     "kwargs": [{}], "reference": "hello there my friend"},
    {"key": "quote", "prompt": "Quote it.", "instruction_id_list": ["startend:quotation"], "kwargs": [{}]},
    {"key": "plain", "prompt": "Name a colour.", "reference": "Red is a colour."},
]
RESPONSES = [
    {"prompt": "Say hello in lowercase.", "response": "hello there my good friend, how are you today"},
    {"prompt": "Quote it.", "response": 'Here:\n"quoted"'},
    {"prompt": "Name a colour.", "response": "Blue is a colour."},
]


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def files(tmp_path) -> tuple[Path, Path, Path]:
    return jsonl(tmp_path / "p.jsonl", PROMPTS), jsonl(tmp_path / "r.jsonl", RESPONSES), tmp_path / "out" / "s.json"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", "score", *args], cwd=ROOT, env=python_env(COLUMNS="120"),
                          capture_output=True, text=True, timeout=120)


def test_end_to_end_table_and_output(files):
    prompts, responses, output = files
    proc = run_cli("--prompts", str(prompts), "--responses", str(responses), "--output", str(output))
    assert proc.returncode == 0, proc.stderr
    assert "if_prompt_strict" in proc.stdout and "rougeL" in proc.stdout
    # 1 of 2 prompts with instructions passes strict (the quote has a preamble line), both pass loose.
    assert "50.00 %" in proc.stdout and "100.00 %" in proc.stdout
    written = json.loads(output.read_text())
    assert written["summary"]["n"] == 3
    assert written["summary"]["if_prompt_strict"] == 0.5 and written["summary"]["if_prompt_loose"] == 1.0
    assert [r["key"] for r in written["results"]] == ["low", "quote", "plain"]
    assert written["results"][1]["strict"] == [False] and written["results"][1]["loose"] == [True]
    assert sorted(p.name for p in output.parent.iterdir()) == ["s.json"]  # no temp file left behind


def test_missing_response_exits_2_with_one_line(files):
    prompts, responses, output = files
    jsonl(responses, RESPONSES[:1])
    proc = run_cli("--prompts", str(prompts), "--responses", str(responses), "--output", str(output))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "no response for 2 of 3 prompts" in lines[0] and "'quote'" in lines[0]
    assert not output.exists() and not output.parent.exists()


def test_usage_error_exits_2(files):
    proc = run_cli("--prompts", str(files[0]))
    assert proc.returncode == 2 and "--responses" in proc.stderr


def call(prompts: Path, responses: Path, output: Path) -> str:
    with pytest.raises(StepwiseError) as info:
        score_cmd.main(["--prompts", str(prompts), "--responses", str(responses), "--output", str(output)])
    assert not output.exists()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_response_names_count_and_first_key(files):
    prompts, responses, output = files
    jsonl(responses, RESPONSES[1:])
    assert call(prompts, responses, output) == (
        f"{responses}: no response for 1 of 3 prompts in {prompts} (first: key 'low', line 1)")


def test_invalid_json_line(files):
    prompts, responses, output = files
    jsonl(responses, [RESPONSES[0], '{"prompt": "Quote it", "response": '])
    assert call(prompts, responses, output).startswith(f"{responses}:2: invalid JSON")


def test_line_without_response(files):
    prompts, responses, output = files
    jsonl(responses, [*RESPONSES[:2], {"prompt": "Name a colour."}])
    assert call(prompts, responses, output) == f"{responses}:3: no `response` string on this line"


def test_line_without_prompt(files):
    prompts, responses, output = files
    jsonl(responses, [{"response": "hi"}])
    assert call(prompts, responses, output).startswith(f"{responses}:1: no `prompt` string")


def test_missing_responses_file(files):
    prompts, responses, output = files
    responses.unlink()
    assert call(prompts, responses, output) == f"{responses}: responses file not found"


def test_bad_prompt_file_writes_nothing(files):
    prompts, responses, output = files
    jsonl(prompts, [PROMPTS[0], "not json"])
    assert call(prompts, responses, output).startswith(f"{prompts}:2: invalid JSON")


@pytest.mark.parametrize("where", ["under_a_file", "deeper_under_a_file", "a_directory"])
def test_unwritable_output_is_one_line_before_scoring(files, where):
    """--output whose folder cannot be made (a file on the way) or that is a folder: one line naming
    --output, exit 2, and nothing written, checked before the responses are even read."""
    prompts, responses, _ = files
    blocker = prompts.parent / "taken.jsonl"
    blocker.write_text("not a folder\n")
    output = {"under_a_file": blocker / "x.json", "deeper_under_a_file": blocker / "a" / "x.json",
              "a_directory": prompts.parent}[where]
    responses.unlink()  # scoring would fail on it: the output check must come first
    before = sorted(p.name for p in prompts.parent.rglob("*"))
    proc = run_cli("--prompts", str(prompts), "--responses", str(responses), "--output", str(output))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --output {output}: "), proc.stderr
    assert ("is a directory" if where == "a_directory" else f"{blocker} is not a directory") in lines[0]
    assert proc.stdout == ""
    assert sorted(p.name for p in prompts.parent.rglob("*")) == before


def test_output_folder_is_made_only_when_scoring_succeeded(files):
    prompts, responses, _ = files
    output = prompts.parent / "new" / "deeper" / "s.json"
    proc = run_cli("--prompts", str(prompts), "--responses", str(responses), "--output", str(output))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(output.read_text())["summary"]["n"] == 3
