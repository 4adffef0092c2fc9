"""trainer.demo.dataset: deterministic, every response passes its constraints, held-out rows stay held out."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest

from trainer.demo import dataset as demo_data
from trainer.demo import tasks
from trainer.evals import scoring
from trainer.evals.prompts import load_prompts


def norm(text: str) -> str:
    return " ".join(text.lower().split())


@pytest.fixture(scope="module")
def default_records() -> list[dict[str, str]]:
    """build_records() as the default job calls it (the slowest thing here: langdetect in the checks)."""
    return demo_data.build_records()


def test_prompt_text_joins_instruction_and_input():
    assert demo_data.prompt_text({"instruction": "Sort.", "input": "b, a"}) == "Sort.\n\nb, a"
    assert demo_data.prompt_text({"instruction": "Count.", "input": ""}) == "Count."


def test_deterministic_for_a_seed():
    a = demo_data.build_records(400, seed=3)
    assert a == demo_data.build_records(400, seed=3)
    assert a != demo_data.build_records(400, seed=4)
    assert all(set(r) == {"instruction", "input", "output"} and all(isinstance(v, str) for v in r.values())
               for r in a)


def test_every_response_passes_its_constraints_checked_again():
    examples = demo_data.build_examples(1200, seed=5)
    constrained = [e for e in examples if e["instruction_id_list"]]
    assert 0.6 < len(constrained) / len(examples) < 0.8
    for e in constrained:
        assert scoring.check_constraints(e["instruction_id_list"], e["kwargs"], e["output"],
                                         demo_data.prompt_text(e)) == [True] * len(e["instruction_id_list"]), e
    used = Counter(i for e in constrained for i in e["instruction_id_list"])
    assert set(used) == set(demo_data.CONSTRAINT_IDS)
    assert {e["task"] for e in examples} == set(demo_data.TASKS)


def test_a_list_comes_last_in_its_prompt_each_item_after_a_space():
    """A reverse or sort prompt ends with its list ("List: a, b, c."), after every constraint sentence,
    each item after a space as in the answer (so the answer repeats the list's very tokens), and the
    answer's items are the list's, reversed or sorted (numbers, by value: "2" before "10")."""
    for name, order in (("reverse_list", lambda xs: tuple(reversed(xs))),
                        ("sort_list", lambda xs: tuple(sorted(xs, key=int)))):
        for seed in range(100):
            base = tasks.TASKS[name](random.Random(seed), tasks.POOLS)
            listed = re.fullmatch(r"List: ((?:\w+, )+\w+)\.", base.input)
            assert listed and ":" not in base.instruction, base
            assert base.items == order(listed[1].split(", ")), base
    examples = [e for e in demo_data.build_examples(600, seed=2) if e["task"] in ("reverse_list", "sort_list")]
    assert len(examples) > 50 and sum(bool(e["instruction_id_list"]) for e in examples) > 25
    assert all(demo_data.prompt_text(e).endswith("\n\n" + e["input"]) for e in examples)


def test_records_are_short(default_records):
    words = [len(scoring.words(demo_data.prompt_text(r) + " " + r["output"])) for r in default_records]
    assert len(default_records) == demo_data.DEFAULT_RECORDS
    assert sum(words) / len(words) < 40
    assert sum(w > 60 for w in words) / len(words) < 0.01


def test_heldout_prompts_never_in_training(default_records):
    training = {norm(demo_data.prompt_text(r)) for r in default_records}
    for name in (demo_data.IFEVAL_FILE, demo_data.GENERAL_FILE):
        for p in load_prompts(demo_data.HELDOUT_DIR / name):
            assert norm(p.prompt) not in training, (name, p.key)


def test_the_split_is_by_prompt_and_every_item_is_trained(default_records):
    """No training prompt is a reserved one; every held-out prompt is reserved or a reserved combination;
    every word, country and fact a held-out answer states occurs in training, so the answer is learnable."""
    assert not any(tasks.is_reserved_prompt(demo_data.prompt_text(r)) for r in default_records)
    training_words = {w for r in default_records
                      for w in re.findall(r"\w+", (demo_data.prompt_text(r) + " " + r["output"]).lower())}
    rows = [json.loads(line) for name in (demo_data.IFEVAL_FILE, demo_data.GENERAL_FILE)
            for line in (demo_data.HELDOUT_DIR / name).read_text().splitlines()]
    combos = {(task, ids) for task, ids in demo_data.RESERVED_COMBOS}
    for row in rows:
        combo = (row["category"], frozenset(row.get("instruction_id_list", [])))
        held = tasks.is_reserved_prompt(row["prompt"]) or combo in combos
        assert held, row["key"]
        if row.get("answer"):
            assert set(re.findall(r"\w+", row["answer"].lower())) <= training_words, row["key"]
    assert set(tasks.VOCABULARY) <= training_words and {c.lower() for c in tasks.CAPITALS} <= training_words


def test_every_heldout_answer_is_found_in_its_reference_and_only_there():
    """The answer key is right for the file's own reference (whatever the constraints did to its form)
    and wrong for another prompt's reference of the same task."""
    rows = [p for name in (demo_data.IFEVAL_FILE, demo_data.GENERAL_FILE)
            for p in load_prompts(demo_data.HELDOUT_DIR / name)]
    answered = [p for p in rows if p.answer is not None]
    assert len(answered) > 150 and {p.category for p in answered} == set(demo_data.TASKS) - {"list_items"}
    assert all(p.answer is None and p.reference is None for p in rows if p.category == "list_items")
    for p in answered:
        assert scoring.answer_correct(p.answer, p.reference), p.key
        others = [q for q in answered if q.category == p.category and q.answer != p.answer]
        assert not any(scoring.answer_correct(p.answer, q.reference) for q in others), p.key


def test_committed_files_equal_regeneration(tmp_path):
    demo_data.main([str(tmp_path)])
    for name in (demo_data.IFEVAL_FILE, demo_data.GENERAL_FILE):
        committed = (demo_data.HELDOUT_DIR / name).read_text(encoding="utf-8")
        assert (tmp_path / name).read_text(encoding="utf-8") == committed, f"regenerate {name}"


def test_heldout_files_load_and_their_references_pass():
    ifeval = load_prompts(demo_data.HELDOUT_DIR / demo_data.IFEVAL_FILE)
    general = load_prompts(demo_data.HELDOUT_DIR / demo_data.GENERAL_FILE)
    assert len(ifeval) == 150 and len(general) == 50
    assert all(p.instruction_id_list and p.category in demo_data.TASKS for p in ifeval)
    assert all(not p.instruction_id_list and p.reference and p.category for p in general)
    for p in ifeval:
        if p.reference is not None:
            result = scoring.score_response(p, p.reference)
            assert result["prompt_strict"] and result["rougeL"] == pytest.approx(1.0), p.key
    rows = [json.loads(line) for line in (demo_data.HELDOUT_DIR / demo_data.IFEVAL_FILE).read_text().splitlines()]
    assert {r["category"] for r in rows} == set(demo_data.TASKS)
