"""trainer.evals.prompts.load_prompts: IFEval's file unchanged, the optional fields, and each bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.core.errors import StepwiseError
from trainer.evals.prompts import load_prompts

IFEVAL_INPUT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ifeval" / "input_data.jsonl"


def write(tmp_path: Path, *lines: str | dict) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines), encoding="utf-8")
    return path


def error(path: Path) -> str:
    with pytest.raises(StepwiseError) as info:
        load_prompts(path)
    message = str(info.value)
    assert "\n" not in message
    return message


GOOD = {"prompt": "Say hi.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}


def test_ifeval_input_loads_unchanged():
    if not IFEVAL_INPUT.exists():
        pytest.skip(f"{IFEVAL_INPUT} not present")
    prompts = load_prompts(IFEVAL_INPUT)
    assert len(prompts) == 541
    assert sum(len(p.instruction_id_list) for p in prompts) == 834
    first = prompts[0]
    assert (first.key, first.line, first.reference, first.category) == ("1000", 1, None, None)
    assert first.instruction_id_list[0] == "punctuation:no_comma"
    assert first.kwargs[2] == {"relation": "at least", "num_words": 300}


def test_optional_fields_blank_lines_and_default_keys(tmp_path):
    path = write(
        tmp_path,
        {"prompt": "Reverse a, b.", "reference": "b, a", "answer": "b, a", "category": "reverse_list"},
        "",
        {"key": 7, "prompt": "Shout.", "instruction_id_list": ["change_case:english_capital"], "kwargs": [{}]},
        {"prompt": "No commas.", "instruction_id_list": ["punctuation:no_comma"]},
        # The Hugging Face copy of IFEval spells out every kwarg, None where unused.
        {"prompt": "Two bullets.", "instruction_id_list": ["detectable_format:number_bullet_lists"],
         "kwargs": [{"num_bullets": 2, "keywords": None, "end_phrase": None}]},
    )
    a, b, c, d = load_prompts(path)
    assert (a.key, a.line, a.reference, a.category, a.instruction_id_list, a.kwargs) == (
        "line-1", 1, "b, a", "reverse_list", [], [])
    assert (a.answer, b.answer) == ("b, a", None)
    assert (b.key, b.line, b.reference) == ("7", 3, None)
    assert (c.key, c.kwargs) == ("line-4", [{}])
    assert d.kwargs == [{"num_bullets": 2, "keywords": None, "end_phrase": None}]


def test_invalid_json(tmp_path):
    path = write(tmp_path, GOOD, '{"prompt": "x",')
    assert error(path).startswith(f"{path}:2: invalid JSON")


def test_line_not_an_object(tmp_path):
    path = write(tmp_path, '["prompt"]')
    assert error(path).startswith(f"{path}:1: expected a JSON object")


def test_missing_prompt(tmp_path):
    path = write(tmp_path, GOOD, {"reference": "x"})
    assert error(path) == f"{path}:2: missing or empty `prompt`"


def test_empty_prompt(tmp_path):
    path = write(tmp_path, {"prompt": "  "})
    assert error(path) == f"{path}:1: missing or empty `prompt`"


def test_unknown_instruction_id(tmp_path):
    path = write(tmp_path, GOOD, GOOD, {"prompt": "x", "instruction_id_list": ["punctuation:no_colon"], "kwargs": [{}]})
    message = error(path)
    assert message.startswith(f"{path}:3: unknown instruction id 'punctuation:no_colon'")


def test_kwargs_not_a_list_of_dicts(tmp_path):
    path = write(tmp_path, {"prompt": "x", "instruction_id_list": ["punctuation:no_comma"], "kwargs": {}})
    assert error(path).startswith(f"{path}:1: `kwargs` must be a list of objects")
    path = write(tmp_path, {"prompt": "x", "instruction_id_list": ["punctuation:no_comma"], "kwargs": ["a"]})
    assert error(path).startswith(f"{path}:1: `kwargs` must be a list of objects")


def test_kwargs_length_differs_from_instructions(tmp_path):
    path = write(tmp_path, {"prompt": "x", "instruction_id_list": ["punctuation:no_comma", "startend:quotation"],
                            "kwargs": [{}]})
    assert error(path).startswith(f"{path}:1: `kwargs` has 1 entries for 2 instruction ids")


def test_kwargs_the_checker_rejects(tmp_path):
    path = write(tmp_path, GOOD, {"prompt": "x", "instruction_id_list": ["length_constraints:number_words"],
                                  "kwargs": [{"relation": "about", "num_words": 5}]})
    message = error(path)
    assert message.startswith(f"{path}:2: length_constraints:number_words rejects kwargs")
    assert "about" in message


def test_kwargs_the_checker_does_not_know(tmp_path):
    path = write(tmp_path, {"prompt": "x", "instruction_id_list": ["punctuation:no_comma"],
                            "kwargs": [{"num_commas": 0}]})
    assert error(path).startswith(f"{path}:1: punctuation:no_comma rejects kwargs")


def test_missing_kwargs_would_be_random(tmp_path):
    path = write(tmp_path, {"prompt": "x", "instruction_id_list": ["keywords:existence"], "kwargs": [{}]})
    assert error(path) == f"{path}:1: keywords:existence needs kwargs keywords"


def test_reference_must_be_text(tmp_path):
    path = write(tmp_path, {"prompt": "x", "reference": 3})
    assert error(path).startswith(f"{path}:1: `reference` must be a string")
    path = write(tmp_path, {"prompt": "x", "answer": ["a"]})
    assert error(path).startswith(f"{path}:1: `answer` must be a string")


def test_duplicate_key(tmp_path):
    path = write(tmp_path, {"key": "a", "prompt": "x"}, {"key": "a", "prompt": "y"})
    assert error(path) == f"{path}:2: duplicate key 'a' (first on line 1)"


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    assert error(path) == f"{path}: prompt file not found"


def test_empty_file(tmp_path):
    path = write(tmp_path, "", "  ")
    assert error(path) == f"{path}: no prompts in file"
