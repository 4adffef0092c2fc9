"""trainer.scoring: IFEval strict/loose against the paper's GPT-4 figures, literal examples, aggregates."""

from __future__ import annotations

import random
import time
from dataclasses import replace
from pathlib import Path

import pytest

from trainer import scoring
from trainer.prompts import HeldoutPrompt, load_prompts
from trainer.score_cmd import load_responses

IFEVAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ifeval"


def pct(summary: dict, name: str) -> float:
    return 100 * summary[name]


@pytest.fixture(scope="module")
def gpt4() -> tuple[list[HeldoutPrompt], dict[str, str]]:
    if not IFEVAL.is_dir():
        pytest.skip(f"{IFEVAL} not present")
    prompts = load_prompts(IFEVAL / "input_data.jsonl")
    responses = load_responses(IFEVAL / "input_response_data_gpt4_20231107_145030.jsonl")
    return prompts, responses


def test_gpt4_figures_are_the_packages_and_fast(gpt4):
    prompts, responses = gpt4
    start = time.perf_counter()
    summary = scoring.summarize([scoring.score_response(p, responses[p.prompt]) for p in prompts])
    assert time.perf_counter() - start < 10
    assert summary["n"] == 541
    # Our deterministic figures (if-verifiable 0.1.2, untrained Punkt, seeded builds).
    assert pct(summary, "if_prompt_strict") == pytest.approx(77.08, abs=0.01)
    assert pct(summary, "if_inst_strict") == pytest.approx(83.69, abs=0.01)
    assert pct(summary, "if_prompt_loose") == pytest.approx(79.67, abs=0.01)
    assert pct(summary, "if_inst_loose") == pytest.approx(85.73, abs=0.01)


def test_gpt4_reproduces_the_paper_given_its_draw_on_prompt_1122(gpt4):
    """IFEval's prompt 1122 asks the letter check for "#", which is no letter, so the checker counts a
    random one; the paper's run drew one that fails. With that draw (q: 0 in the response) every other
    verdict gives the paper's strict figures exactly."""
    prompts, responses = gpt4
    (p1122,) = [p for p in prompts if p.key == "1122"]
    assert p1122.kwargs[1]["letter"] == "#"
    turned = [replace(p, kwargs=[p.kwargs[0], {**p.kwargs[1], "letter": "q"}]) if p.key == "1122" else p
              for p in prompts]
    summary = scoring.summarize([scoring.score_response(p, responses[p.prompt]) for p in turned])
    assert pct(summary, "if_prompt_strict") == pytest.approx(76.89, abs=0.01)
    assert pct(summary, "if_inst_strict") == pytest.approx(83.57, abs=0.01)
    assert pct(summary, "if_prompt_loose") == pytest.approx(79.30, abs=0.5)
    assert pct(summary, "if_inst_loose") == pytest.approx(85.37, abs=0.5)


def test_random_draws_are_seeded_and_leave_the_callers_random_state_alone():
    letters = []
    for outside_seed in (1, 2):
        scoring._build_checker.cache_clear()
        random.seed(outside_seed)
        state = random.getstate()
        checker = scoring.build_checker("keywords:letter_frequency",
                                        {"letter": "#", "let_frequency": 4, "let_relation": "at least"})
        assert random.getstate() == state
        letters.append(checker.get_instruction_args()["letter"])
    assert letters[0] == letters[1]


def prompt(ids: list[str], kwargs: list[dict] | None = None, reference: str | None = None) -> HeldoutPrompt:
    return HeldoutPrompt(key="k", prompt="Say hi.", instruction_id_list=ids,
                         kwargs=kwargs if kwargs is not None else [{} for _ in ids], reference=reference)


def test_strict_fails_but_loose_passes_when_only_a_preamble_line_breaks_the_rule():
    p = prompt(["startend:quotation", "detectable_format:json_format"])
    r = scoring.score_response(p, 'Sure, here it is:\n"hello"')
    # Without its first line the response is '"hello"': quoted, and a JSON string too.
    assert r["strict"] == [False, False]
    assert r["loose"] == [True, True]
    assert (r["prompt_strict"], r["prompt_loose"]) == (False, True)
    json_only = scoring.score_response(prompt(["detectable_format:json_format"]), 'Here is the JSON:\n{"a": 1}')
    assert (json_only["strict"], json_only["loose"]) == ([False], [True])


def test_loose_also_drops_markdown_asterisks():
    p = prompt(["startend:end_checker"], [{"end_phrase": "Bye now."}])
    r = scoring.score_response(p, "Hi there. **Bye now.**")
    assert (r["strict"], r["loose"]) == ([False], [True])


def test_strict_pass_and_empty_response_fail():
    p = prompt(["punctuation:no_comma", "change_case:english_lowercase"])
    assert scoring.score_response(p, "hello there my friend how are you today")["strict"] == [True, True]
    empty = scoring.score_response(p, "   ")
    assert empty["strict"] == [False, False] and empty["loose"] == [False, False]


def test_sentence_and_word_tokenizers_work_offline():
    # Both need punkt_tab in stock NLTK >= 3.9; the untrained Punkt needs no download.
    assert scoring.check_constraints(["length_constraints:number_sentences"],
                                     [{"relation": "less than", "num_sentences": 3}], "One thing. Two things.") == [True]
    assert scoring.check_constraints(["length_constraints:number_sentences"],
                                     [{"relation": "at least", "num_sentences": 3}], "One thing. Two things.") == [False]
    assert scoring.check_constraints(["change_case:capital_word_frequency"],
                                     [{"capital_relation": "at least", "capital_frequency": 2}],
                                     "THIS is BIG. Yes.") == [True]


def test_check_constraints_drops_none_kwargs_like_hf_ifeval_rows():
    kwargs = [{"num_bullets": 2, "end_phrase": None, "keywords": None}]
    assert scoring.check_constraints(["detectable_format:number_bullet_lists"], kwargs, "* a\n* b") == [True]
    assert scoring.check_constraints(["detectable_format:number_bullet_lists"], kwargs, "* a") == [False]


def test_score_response_fields_rouge_and_length():
    r = scoring.score_response(prompt([], reference="The cats are running home."), "the cat runs home")
    assert r["prompt_strict"] is None and r["prompt_loose"] is None
    assert r["strict"] == [] and r["length"] == 4
    # Stemming: cats/cat and running/runs count as the same words; 4 of 5 reference words match.
    assert r["rougeL"] == pytest.approx(2 * (4 / 4) * (4 / 5) / (4 / 4 + 4 / 5))
    assert scoring.score_response(prompt([]), "x")["rougeL"] is None


def test_summarize_by_hand():
    results = [
        {"strict": [True, False], "loose": [True, True], "prompt_strict": False, "prompt_loose": True,
         "rougeL": None, "length": 4, "response": "a b a b"},
        {"strict": [True], "loose": [True], "prompt_strict": True, "prompt_loose": True,
         "rougeL": 0.5, "length": 2, "response": "A b"},
        {"strict": [], "loose": [], "prompt_strict": None, "prompt_loose": None,
         "rougeL": 1.0, "length": 0, "response": ""},
    ]
    s = scoring.summarize(results, finished=[True, False, True])
    assert s["n"] == 3
    assert s["if_prompt_strict"] == pytest.approx(1 / 2) and s["if_prompt_loose"] == 1.0
    assert s["if_inst_strict"] == pytest.approx(2 / 3) and s["if_inst_loose"] == 1.0
    assert s["rougeL"] == pytest.approx(0.75)
    assert s["mean_length"] == pytest.approx(2.0)
    # Bigrams: (a b) (b a) (a b) in the first response, (a b) in the second: 2 distinct of 4.
    assert s["distinct_2"] == pytest.approx(0.5)
    assert s["eos_rate"] == pytest.approx(2 / 3)


def test_summarize_without_instructions_or_finished():
    s = scoring.summarize([{"strict": [], "loose": [], "prompt_strict": None, "prompt_loose": None,
                            "rougeL": None, "length": 1, "response": "hi"}])
    assert all(s[k] is None for k in ("if_prompt_strict", "if_prompt_loose", "if_inst_strict", "if_inst_loose",
                                      "rougeL", "distinct_2", "eos_rate"))
    with pytest.raises(ValueError):
        scoring.summarize([], finished=[True])
