"""Votes file, Bradley-Terry ratings and the preference-dataset export (app/votes.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from app.votes import (
    BASE_RATING,
    Vote,
    VoteStore,
    bradley_terry,
    ratings,
    ratings_table,
    ratings_tables,
)
from app.votes import main as votes_main
from trainer.cli.args import run_command
from trainer.core.errors import StepwiseError

ROOT = Path(__file__).resolve().parents[1]


def test_append_and_read_back_without_personal_data(tmp_path):
    store = VoteStore(tmp_path)
    store.append(Vote("run/step-000010", "run/step-000020", "b", prompt="hi", answers=["x", "y"]))
    store.append(Vote("run/step-000010", "run/step-000020", "tie"))
    lines = (tmp_path / "votes.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert set(first) == {"a", "b", "outcome", "prompt", "answers", "key", "settings", "time", "histories", "blind"}
    assert first["time"].endswith("Z")
    assert [v.outcome for v in store.read()] == ["b", "tie"]


def test_bad_lines_are_skipped(tmp_path):
    store = VoteStore(tmp_path)
    store.append(Vote("a", "b", "a"))
    with open(store.path, "a") as f:
        f.write('{"a": "a", "b": "b", "outc\n')
        f.write('{"a": "a", "b": "b", "outcome": "nonsense"}\n')
    store.append(Vote("a", "b", "b"))
    assert [v.outcome for v in store.read()] == ["a", "b"]


def test_vote_validation():
    with pytest.raises(StepwiseError, match="outcome"):
        Vote("a", "b", "left")
    with pytest.raises(StepwiseError, match="different"):
        Vote("a", "a", "a")


def test_concurrent_appends_do_not_interleave(tmp_path):
    store = VoteStore(tmp_path)
    threads = [threading.Thread(target=lambda i=i: store.append(Vote(f"c{i}", "z", "a", prompt="p" * 5000)))
               for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.read()) == 20


def test_ratings_order_counts_and_symmetry():
    votes = [Vote("s10", "s20", "b")] * 6 + [Vote("s10", "s20", "a")] * 2 + [Vote("s20", "s30", "tie")] * 2
    votes += [Vote("s10", "s30", "both_bad")]
    rows = {r.checkpoint: r for r in ratings(votes)}
    assert rows["s20"].rating > rows["s10"].rating
    assert (rows["s20"].wins, rows["s20"].losses, rows["s20"].ties) == (6, 2, 2)
    assert rows["s10"].votes == 9 and rows["s10"].both_bad == 1
    assert rows["s30"].votes == 3
    # Ties alone leave everyone at the anchor; order of votes does not matter.
    assert all(abs(r.rating - BASE_RATING) < 1e-6 for r in ratings([Vote("x", "y", "tie")] * 3))
    assert bradley_terry(votes) == pytest.approx(bradley_terry(list(reversed(votes))))


def test_undefeated_checkpoint_stays_finite():
    table = ratings_table([Vote("good", "bad", "a")] * 50)
    assert table[0][0] == "good" and table[0][1] > BASE_RATING > table[1][1]
    assert table[0][1] < 3000
    assert ratings_table([]) == []


def test_blind_votes_are_rated_apart_from_open_ones(tmp_path):
    store = VoteStore(tmp_path)
    for vote in [Vote("s10", "s20", "b")] * 3 + [Vote("s10", "s20", "a", blind=True)] * 2:
        store.append(vote)
    votes = store.read()
    assert [v.blind for v in votes] == [False] * 3 + [True] * 2
    open_rows, blind_rows = ratings_tables(votes)
    assert open_rows == ratings_table(votes[:3]) and blind_rows == ratings_table(votes[3:])
    assert open_rows[0][0] == "s20" and blind_rows[0][0] == "s10"  # the two kinds disagree: never pooled
    assert ratings_tables([]) == ([], [])

# --- export as a preference dataset -------------------------------------------------------------

SETTINGS = {"max_new_tokens": 32, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0, "seed": 0}
A, B = "run/step-000010", "run/step-000020"


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def single_turn_votes(root) -> VoteStore:
    store = VoteStore(root)
    store.append(Vote(A, B, "b", prompt="Sort: 3, 1, 2", answers=["3, 1, 2", "1, 2, 3"], key="sort-1",
                      settings=SETTINGS, histories=[[user("Sort: 3, 1, 2")], [user("Sort: 3, 1, 2")]]))
    store.append(Vote(A, B, "tie", prompt="Hi", answers=["Hello.", "Hi!"], settings=SETTINGS))
    store.append(Vote(A, B, "both_bad", prompt="2+2?", answers=["5", "22"], settings=SETTINGS))
    store.append(Vote(A, B, "a", prompt="no answers recorded"))
    with open(store.path, "a", encoding="utf-8") as f:
        # A line from before `histories` existed, and a torn one.
        f.write(json.dumps({"a": B, "b": A, "outcome": "a", "prompt": "Capital of France?",
                            "answers": ["Paris.", "Lyon."],
                            "key": None, "settings": {}, "time": "2025-01-01T00:00:00Z"}) + "\n")
        f.write('{"a": "x", "b": \n')
    return store


def export(argv: list[str], capsys) -> tuple[int, str, str]:
    code = run_command(votes_main, ["export", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_export_single_turn_votes_as_trls_standard_form(tmp_path, capsys):
    store = single_turn_votes(tmp_path)
    code, out, _ = export(["--root", str(tmp_path)], capsys)
    assert code == 0
    assert out.strip() == (f"wrote 2 preference pairs, standard (text), to {tmp_path / 'preferences.jsonl'}; left out: "
                           "1 tie, 1 both bad, 1 without a shared prompt and two answers, 1 unreadable line")
    first, old = read_rows(tmp_path / "preferences.jsonl")
    time = store.read()[0].time
    assert first == {"prompt": "Sort: 3, 1, 2", "chosen": "1, 2, 3", "rejected": "3, 1, 2", "chosen_checkpoint": B,
                     "rejected_checkpoint": A, "settings": SETTINGS, "key": "sort-1", "time": time}
    assert (old["prompt"], old["chosen"], old["rejected"]) == ("Capital of France?", "Paris.", "Lyon.")
    assert (old["chosen_checkpoint"], old["rejected_checkpoint"], old["settings"]) == (B, A, {})
    # Asked for, single-turn rows are conversational too.
    out_file = tmp_path / "sub" / "conv.jsonl"
    assert export(["--root", str(tmp_path), "--out", str(out_file), "--conversational"], capsys)[0] == 0
    row = read_rows(out_file)[0]
    assert (row["prompt"], row["chosen"], row["rejected"]) == (
        [user("Sort: 3, 1, 2")], [assistant("1, 2, 3")], [assistant("3, 1, 2")])


def multi_turn_votes(root) -> VoteStore:
    store = single_turn_votes(root)
    same = [user("Name a fruit."), assistant("Apple."), user("And a colour?")]
    store.append(Vote(A, B, "a", prompt="And a colour?", answers=["Red.", "Fruit."], settings=SETTINGS,
                      histories=[same, same]))
    # Each column keeps its own history: after different first answers, the prompt is what both saw.
    store.append(Vote(A, B, "b", prompt="Shorter?", answers=["No.", "Sure: hi."], settings=SETTINGS,
                      histories=[[user("Greet me."), assistant("Hello there, friend."), user("Shorter?")],
                                 [user("Greet me."), assistant("Hi there, dear friend."), user("Shorter?")]]))
    return store


def test_export_multi_turn_votes_in_conversational_form(tmp_path, capsys):
    multi_turn_votes(tmp_path)
    code, out, _ = export(["--root", str(tmp_path), "--out", str(tmp_path / "prefs.jsonl")], capsys)
    assert code == 0 and "wrote 4 preference pairs, conversational, to" in out
    sort, old, same, diverged = read_rows(tmp_path / "prefs.jsonl")
    # One column type per dataset: the single-turn pairs are messages too.
    assert (sort["prompt"], sort["chosen"]) == ([user("Sort: 3, 1, 2")], [assistant("1, 2, 3")])
    assert old["prompt"] == [user("Capital of France?")]
    assert same["prompt"] == [user("Name a fruit."), assistant("Apple."), user("And a colour?")]
    assert (same["chosen"], same["rejected"]) == ([assistant("Red.")], [assistant("Fruit.")])
    assert diverged["prompt"] == [user("Greet me.")]
    assert diverged["chosen"] == [assistant("Hi there, dear friend."), user("Shorter?"), assistant("Sure: hi.")]
    assert diverged["rejected"] == [assistant("Hello there, friend."), user("Shorter?"), assistant("No.")]
    assert (diverged["chosen_checkpoint"], diverged["rejected_checkpoint"]) == (B, A)


def test_histories_are_validated_and_old_lines_still_load(tmp_path):
    with pytest.raises(StepwiseError, match="histories"):
        Vote(A, B, "a", histories=[[user("x")]])
    with pytest.raises(StepwiseError, match="histories"):
        Vote(A, B, "a", histories=[[user("x")], [{"role": "user"}]])
    store = single_turn_votes(tmp_path)
    votes, bad = store.read_counted()
    assert [v.outcome for v in votes] == ["b", "tie", "both_bad", "a", "a"] and bad == 1
    assert votes[-1].histories == [] and votes[0].histories[0] == [user("Sort: 3, 1, 2")]


def test_export_mistakes_are_one_line_exit_2_and_write_nothing(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert export(["--root", str(missing)], capsys)[1:] == ("", f"error: --root {missing}: no such folder\n")
    code, _, err = export(["--root", str(tmp_path)], capsys)
    assert (code, err) == (2, f"error: {tmp_path / 'votes.jsonl'}: no votes file (votes are recorded in the web "
                               "app's Compare tab)\n")
    VoteStore(tmp_path).append(Vote(A, B, "tie", prompt="Hi", answers=["a", "b"]))
    code, _, err = export(["--root", str(tmp_path)], capsys)
    assert (code, err) == (2, f"error: {tmp_path / 'votes.jsonl'}: no decisive votes to export (left out: 1 tie)\n")
    single_turn_votes(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for out, why in ((tmp_path, "is a directory"), (blocker / "x.jsonl", "cannot write")):
        code, _, err = export(["--root", str(tmp_path), "--out", str(out)], capsys)
        assert code == 2 and err.startswith(f"error: --out {out}: {why}") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "votes.jsonl"]


def test_export_command_line(tmp_path):
    single_turn_votes(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "app.votes", "export", "--root", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("wrote 2 preference pairs") and proc.stderr == ""
    proc = subprocess.run([sys.executable, "-m", "app.votes", "export", "--root", str(tmp_path / "nope")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


@pytest.mark.filterwarnings("ignore:.*checkpointing.*:FutureWarning")  # inside TRL and transformers
def test_trl_reads_the_export_and_dpo_trains_on_it(tmp_path, trained_checkpoint, capsys):
    pytest.importorskip("trl", reason="TRL is a dev dependency (pip install -e '.[dev]'): it checks the export")
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    from trl.data_utils import (
        is_conversational,
        maybe_apply_chat_template,
        maybe_extract_prompt,
    )

    multi_turn_votes(tmp_path)
    standard, conversational = tmp_path / "standard.jsonl", tmp_path / "conversational.jsonl"
    assert export(["--root", str(tmp_path), "--out", str(conversational)], capsys)[0] == 0
    (tmp_path / "one").mkdir()
    single_turn_votes(tmp_path / "one")
    assert export(["--root", str(tmp_path / "one"), "--out", str(standard)], capsys)[0] == 0
    checkpoint = trained_checkpoint
    tok = AutoTokenizer.from_pretrained(checkpoint)
    for path, conv in ((standard, False), (conversational, True)):
        dataset = load_dataset("json", data_files=str(path), split="train")
        assert {"prompt", "chosen", "rejected", "chosen_checkpoint", "rejected_checkpoint"} <= set(dataset.column_names)
        for row in dataset:
            assert is_conversational(row) is conv
            assert maybe_extract_prompt(row) == row  # an explicit prompt: nothing for TRL to extract
            text = maybe_apply_chat_template(row, tok)
            if conv:  # the prompt and each answer render as the checkpoint's template renders the conversation
                whole = tok.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
                assert text["prompt"] + text["chosen"] == whole and text["prompt"].endswith("### Response:\n")
            else:
                assert text == row
    # DPOTrainer tokenizes the conversational file with the checkpoint's template and takes a step on it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(checkpoint), processing_class=tok,
                             train_dataset=load_dataset("json", data_files=str(conversational), split="train"),
                             args=DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=1, report_to=[],
                                            use_cpu=True, save_strategy="no", max_length=128))
        diverged = trainer.train_dataset[3]
        assert tok.decode(diverged["prompt_ids"]) == "### Instruction:\nGreet me.\n\n### Response:\n"
        assert tok.decode(diverged["chosen_ids"]).endswith("### Response:\nSure: hi.</s>")
        assert torch.isfinite(torch.tensor(trainer.train().training_loss))
    finally:
        torch.set_num_threads(threads)
