"""Votes file and Bradley-Terry ratings (app/votes.py)."""

from __future__ import annotations

import json
import threading

import pytest

from app.votes import (
    BASE_RATING,
    Vote,
    VoteStore,
    bradley_terry,
    ratings,
    ratings_table,
)
from trainer.core.errors import StepwiseError


def test_append_and_read_back_without_personal_data(tmp_path):
    store = VoteStore(tmp_path)
    store.append(Vote("run/step-000010", "run/step-000020", "b", prompt="hi", answers=["x", "y"]))
    store.append(Vote("run/step-000010", "run/step-000020", "tie"))
    lines = (tmp_path / "votes.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert set(first) == {"a", "b", "outcome", "prompt", "answers", "key", "settings", "time"}
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
