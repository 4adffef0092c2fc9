"""trainer.evals.scoring: IFEval strict/loose against the paper's GPT-4 figures, substituted kwargs, literal examples,
aggregates."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from trainer.cli.score import load_responses
from trainer.evals import registry, scoring
from trainer.evals.prompts import HeldoutPrompt, load_prompts

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


def test_gpt4_reproduces_the_papers_figures_and_lists_the_substituted_checks(gpt4):
    prompts, responses = gpt4
    start = time.perf_counter()
    results = [scoring.score_response(p, responses[p.prompt]) for p in prompts]
    summary = scoring.summarize(results)
    assert time.perf_counter() - start < 10
    assert summary["n"] == 541
    # The seeded draw for the non-letters of 1122 and 1129 fails 1122 and passes 1129, as the paper's
    # run did: its strict figures exactly (416/541 prompts, 697/834 instructions).
    assert pct(summary, "if_prompt_strict") == pytest.approx(76.89, abs=0.01)
    assert pct(summary, "if_inst_strict") == pytest.approx(83.57, abs=0.01)
    # Loose: ours exactly (430/541, 714/834; if-verifiable 0.1.2, untrained Punkt), within 0.5 of
    # the paper's 79.30 / 85.37.
    assert pct(summary, "if_prompt_loose") == pytest.approx(79.48, abs=0.01)
    assert pct(summary, "if_inst_loose") == pytest.approx(85.61, abs=0.01)
    assert pct(summary, "if_prompt_loose") == pytest.approx(79.30, abs=0.5)
    assert pct(summary, "if_inst_loose") == pytest.approx(85.37, abs=0.5)
    # Exactly two checks run on a substituted value: the letter check of 1122 ("#") and 1129 ("!").
    assert [(r["key"], r["unverified"]) for r in results if r["unverified"]] == [
        ("1122", ["keywords:letter_frequency"]), ("1129", ["keywords:letter_frequency"])]
    assert all(isinstance(r["unverified"], list) for r in results)
    by_key = {r["key"]: r for r in results}
    # 1122 fails the letter check strict and loose (same built checker, same letter); 1129 passes.
    assert (by_key["1122"]["strict"][1], by_key["1122"]["loose"][1]) == (False, False)
    assert (by_key["1129"]["strict"][0], by_key["1129"]["loose"][0]) == (True, True)


def test_the_seeded_letter_is_one_that_reproduces_the_paper():
    # c, g, h, p, u, v, w are the letters that fail 1122 and pass 1129 on GPT-4's responses.
    for bad in ("#", "!"):
        checker = registry.build_checker("keywords:letter_frequency",
                                        {"letter": bad, "let_frequency": 4, "let_relation": "at least"})
        assert checker.get_instruction_args()["letter"] == "p"


def test_substituted_kwargs_are_listed_and_still_checked():
    ids = ["keywords:letter_frequency"]
    kw = {"letter": "#", "let_frequency": 1000, "let_relation": "less than"}
    assert registry.unhonoured_kwargs(ids[0], kw) == ["letter"]
    r = scoring.score_response(prompt(ids, [kw]), "Hello world. #tag")
    # Fewer than 1000 of any letter: the check passes whatever letter was drawn.
    assert (r["strict"], r["loose"], r["unverified"]) == ([True], [True], ["keywords:letter_frequency"])
    assert registry.unhonoured_kwargs("keywords:letter_frequency",
                                     {"letter": "x", "let_frequency": -1, "let_relation": "at least"}) == ["let_frequency"]
    assert registry.unhonoured_kwargs("keywords:existence", {"keywords": []}) == ["keywords"]


def test_values_the_checker_only_normalises_count_as_honoured():
    assert registry.unhonoured_kwargs("keywords:letter_frequency",
                                     {"letter": "A", "let_frequency": 2, "let_relation": "at least"}) == []
    assert registry.unhonoured_kwargs("keywords:existence", {"keywords": ["zeta", "alpha"]}) == []
    assert registry.unhonoured_kwargs("keywords:forbidden_words", {"forbidden_words": ["b", "a", "b"]}) == []
    assert registry.unhonoured_kwargs("startend:end_checker", {"end_phrase": " Bye now. "}) == []
    assert registry.unhonoured_kwargs("length_constraints:nth_paragraph_first_word",
                                     {"num_paragraphs": 2, "nth_paragraph": 1, "first_word": "Hello"}) == []
    r = scoring.score_response(prompt(["keywords:letter_frequency"],
                                      [{"letter": "A", "let_frequency": 2, "let_relation": "at least"}]), "a banana")
    assert (r["strict"], r["unverified"]) == ([True], [])


def test_random_draws_are_seeded_and_leave_the_callers_random_state_alone():
    letters = []
    for outside_seed in (1, 2):
        registry._build_checker.cache_clear()
        random.seed(outside_seed)
        state = random.getstate()
        checker = registry.build_checker("keywords:letter_frequency",
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
    assert r["strict"] == [] and r["unverified"] == [] and r["length"] == 4
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


@pytest.mark.parametrize(("response", "right"), [
    ("The sorted list is: cat, dog.", True),
    ('"THE SORTED LIST IS: CAT, DOG."', True),                          # quoted, capitalised
    ("<<sorted list>>\nThe sorted list is:\n* cat\n* dog\nThat is all.", True),  # titled, bulleted
    ("The sorted list is: cat; dog. Have a nice day.", True),           # no commas, more sentences
    ('{"answer": "The sorted list is: cat, dog. Thanks."}', True),      # inside JSON
    ("The sorted list is: cat, dog, owl.", False),                      # an extra item
    ("The sorted list is:\n* cat\n* dog\n* owl", False),                # an extra bullet
    ("The sorted list is: dog, cat.", False),                           # the wrong order
    ("The sorted list is: cat.", False),                                # an item missing
    ("", False),
])
def test_answer_correct_reads_the_content_whatever_its_form(response, right):
    assert scoring.answer_correct("The sorted list is: cat, dog.", response) is right


def test_task_accuracy_counts_only_prompts_with_an_answer():
    with_answer = HeldoutPrompt("a", "What is 2 plus 3?", answer="The answer is 5.")
    rows = [scoring.score_response(with_answer, "The answer is 5."),
            scoring.score_response(with_answer, "The answer is 6."),
            scoring.score_response(prompt([]), "anything")]
    assert [r["correct"] for r in rows] == [True, False, None]
    assert scoring.summarize(rows)["task_accuracy"] == pytest.approx(0.5)
    assert scoring.summarize(rows[2:])["task_accuracy"] is None
