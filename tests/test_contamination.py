"""trainer.evals.contamination: exact copies and n-gram near-duplicates of held-out prompts in training data."""

from __future__ import annotations

import io

from rich.console import Console

from trainer.evals.contamination import (
    check_prompts_against_records,
    find_contamination,
    warn,
)

LONG = ("Write a short story about a lighthouse keeper who finds a message in a bottle, and end it with "
        "the exact phrase 'the tide always returns'. Use no commas in the first paragraph.")
TRAIN = [
    "Name three fruits.",
    "  NAME three\tfruits. ",  # the same prompt again, other case and spacing
    LONG.replace("lighthouse keeper", "fisherman"),  # one phrase changed: a near-duplicate source
    "Translate 'good morning' into French and explain when it is used in conversation with friends.",
]


def test_exact_and_near_duplicates_are_found():
    heldout = [
        "name   three FRUITS.",  # exact after case and whitespace
        LONG,  # near: most of its 8-grams are in TRAIN[2]
        "Explain how photosynthesis works to a ten year old child using a simple everyday analogy.",
        "Name four fruits.",  # short and different: not flagged
    ]
    found = find_contamination(heldout, TRAIN, n=8, threshold=0.5, keys=["a", "b", "c", "d"])
    assert found["exact"] == [0]
    assert [x["index"] for x in found["near"]] == [1]
    near = found["near"][0]
    assert near["key"] == "b" and near["train_index"] == 2 and 0.5 <= near["overlap"] < 1.0
    assert found["count"] == 2 and found["indices"] == [0, 1] and found["keys"] == ["a", "b"]


def test_threshold_and_n_decide_near():
    heldout = [LONG]
    assert find_contamination(heldout, TRAIN, n=8, threshold=0.99)["count"] == 0
    mostly_new = " ".join(["completely", "different", "words"] * 6 + LONG.split()[-12:])
    assert find_contamination([mostly_new], TRAIN, n=8, threshold=0.5)["count"] == 0
    assert find_contamination([mostly_new], TRAIN, n=8, threshold=0.1)["count"] == 1


def test_records_use_their_user_turns_only():
    records = [{"messages": [{"role": "user", "content": "Name three fruits."},
                             {"role": "assistant", "content": "Apple, pear, plum."}]}]
    found = check_prompts_against_records(["Apple, pear, plum.", "name three fruits."], records, keys=["x", "y"])
    assert found["keys"] == ["y"]


def test_warn_prints_the_count_and_first_keys():
    buf = io.StringIO()
    found = find_contamination(["name three fruits.", LONG], TRAIN, n=8, threshold=0.5, keys=["k1", "k2"])
    warn(found, Console(file=buf, width=200), "run's training data")
    text = buf.getvalue()
    assert "2 of 2 held-out prompt(s)" in text and "k1, k2" in text and "1 exact, 1 near-duplicate" in text
    buf2 = io.StringIO()
    warn(find_contamination(["something else entirely"], TRAIN), Console(file=buf2))
    assert buf2.getvalue() == ""


def test_templated_data_gets_a_note_for_near_duplicates_and_a_warning_for_copies():
    near = find_contamination([LONG], TRAIN, n=8, threshold=0.5, keys=["k2"])
    buf = io.StringIO()
    warn(near, Console(file=buf, width=300), "the demo data", templated=True)
    assert buf.getvalue().startswith("note: 1 of 1 held-out prompts share template wording with the demo data")
    assert "warning" not in buf.getvalue() and buf.getvalue().count("\n") == 1
    both = find_contamination(["name three fruits.", LONG], TRAIN, n=8, threshold=0.5, keys=["k1", "k2"])
    buf = io.StringIO()
    warn(both, Console(file=buf, width=300), "the demo data", templated=True)
    assert buf.getvalue().startswith("warning: 2 of 2") and "1 exact" in buf.getvalue()


def test_many_prompts_in_one_pass():
    train = [f"item {i} of the generated training set with a few more words to make grams {i * 7}" for i in range(20000)]
    heldout = [f"held out prompt number {i} that shares nothing much with any of those lines" for i in range(2000)]
    found = find_contamination(heldout + [train[123].upper(), train[456] + " please"], train)
    assert found["exact"] == [2000]
    assert [x["index"] for x in found["near"]] == [2001] and found["near"][0]["train_index"] == 456
    assert found["train_prompts"] == 20000 and found["heldout_prompts"] == 2002


def test_defaults_are_13_grams_at_80_percent():
    found = find_contamination([LONG], TRAIN)
    assert (found["n"], found["threshold"]) == (13, 0.8)
    assert found["count"] == 0  # one changed phrase removes too many 13-grams for the 80% cut-off
