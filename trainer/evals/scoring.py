"""Scores for held-out responses: IFEval's and IFBench's checks (strict and loose), ROUGE-L, task
accuracy (the prompt's `answer`, see answer_correct), length and repetition.

The checks are if-verifiable's copies of Google's IFEval and AllenAI's IFBench checkers, one registry
keyed by instruction id (trainer.evals.registry), driven the way both benchmarks' evaluation_lib.py
drive them (`test_instruction_following_strict` / `_loose`): kwargs with None values dropped, the
prompt handed to `build_description` when a checker asks for it, a response that is empty or
whitespace fails, and loose passes when any of eight variants of the response passes (as is, without
`*`, without its first line, last line or both, and those three without `*`). The four IF metrics
keep IFEval's names for either benchmark (IFBench defines them the same way).

The checkers, their offline NLTK substitutes and their seeded builds are trainer.evals.registry's.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

from trainer.evals.prompts import HeldoutPrompt
from trainer.evals.registry import SUBSTITUTES, build_and_unhonoured

# IFEval counts words as runs of \w (instructions_util.count_words); `length` uses the same rule so
# that it agrees with length_constraints:number_words.
_WORD = re.compile(r"\w+")

# The summary metrics every report shows, in this order (the prompt-file metrics in the README); summarize() also gives
# n, mean_length, distinct_2 and eos_rate.
SUMMARY_METRICS = ("if_prompt_strict", "if_prompt_loose", "if_inst_strict", "if_inst_loose", "rougeL", "task_accuracy")
IF_METRICS = SUMMARY_METRICS[:4]  # IFEval's four: prompt- and instruction-level, strict and loose

def loose_variants(response: str) -> list[str]:
    """IFEval's eight loose variants, in evaluation_lib's order."""
    lines = response.split("\n")
    remove_first = "\n".join(lines[1:]).strip()
    remove_last = "\n".join(lines[:-1]).strip()
    remove_both = "\n".join(lines[1:-1]).strip()
    return [response, response.replace("*", ""), remove_first, remove_last, remove_both,
            remove_first.replace("*", ""), remove_last.replace("*", ""), remove_both.replace("*", "")]


def _follows(checker: Any, text: str) -> bool:
    return bool(text.strip() and checker.check_following(text))


def _check(instruction_id_list: Sequence[str], kwargs: Sequence[Mapping[str, Any]] | None, response: str,
           prompt: str, loose: bool = True) -> tuple[list[bool], list[bool], list[str]]:
    """Strict verdicts, loose verdicts (empty unless loose), and the ids whose given kwargs the
    checker substituted."""
    kwargs = list(kwargs) if kwargs else [{}] * len(instruction_id_list)
    variants = loose_variants(response) if loose else []
    strict_verdicts, loose_verdicts, unverified = [], [], []
    for instruction_id, kw in zip(instruction_id_list, kwargs, strict=True):
        checker, unhonoured = build_and_unhonoured(instruction_id, kw, prompt)
        if unhonoured:
            unverified.append(instruction_id)
        strict_verdicts.append(_follows(checker, response))
        if loose:
            loose_verdicts.append(any(_follows(checker, v) for v in variants))
    return strict_verdicts, loose_verdicts, unverified


def check_constraints(instruction_id_list: Sequence[str], kwargs: Sequence[Mapping[str, Any]] | None,
                      response: str, prompt: str = "") -> list[bool]:
    """Strict verdict per instruction (IFEval's or IFBench's check, by id)."""
    return _check(instruction_id_list, kwargs, response, prompt, loose=False)[0]


@functools.cache
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(reference: str, response: str) -> float:
    """ROUGE-L F-measure (rouge-score, Porter stemming)."""
    return float(_rouge_scorer().score(reference, response)["rougeL"].fmeasure)


def words(text: str) -> list[str]:
    return _WORD.findall(text)


# A response's statements: split after a sentence's end and at line breaks, except a line break that
# starts a bullet ("* x", "- x"), so a bulleted list stays with the line that introduces it.
_STATEMENT_BREAK = re.compile(r"(?<=[.!?])\s+|\n(?![ \t]*[*-][ \t])")


def _unwrapped(response: str) -> str:
    """The text inside a JSON wrapping (the string values of a JSON object, or a JSON string), else the
    response itself."""
    import json

    try:
        value = json.loads(response)
    except ValueError:
        return response
    if isinstance(value, dict):
        value = "\n".join(v for v in value.values() if isinstance(v, str))
    return value if isinstance(value, str) else response


def answer_correct(answer: str, response: str) -> bool:
    """Task accuracy's check: some statement of the response (a sentence or a line; a bulleted list
    with the line before it), word for word, is the answer, ignoring case and punctuation. Inside
    JSON, the string values are read. So "The sorted list is: cat, dog." is found in a quoted, capitalised,
    bulleted or titled answer, but not in "The sorted list is: cat, dog, owl." (an extra item) or
    "The sorted list is: dog, cat." (the wrong order)."""
    want = [w.lower() for w in words(answer)]
    return bool(want) and any([w.lower() for w in words(part)] == want
                              for part in _STATEMENT_BREAK.split(_unwrapped(response.strip())))


def score_response(p: HeldoutPrompt, response: str) -> dict[str, Any]:
    """Per-prompt scores; prompt_strict/loose are None when the prompt carries no instructions.
    "unverified" lists the instruction ids checked with a value the checker substituted for the one
    given (IFEval's 1122 and 1129: a seeded random letter for a non-letter); empty otherwise.
    "substituted" lists the instruction ids whose check ran on an offline stand-in for NLTK data
    (registry.SUBSTITUTES: the untrained sentence splitter, the embedded stop-word list, the
    first-word verb rule); empty otherwise. Both keep the order of instruction_id_list. "reference" is
    the prompt's reference answer (None without one), kept so a stored sample shows what was wanted.
    "correct" is answer_correct against the prompt's `answer` (None without one)."""
    strict, loose, unverified = _check(p.instruction_id_list, p.kwargs, response, p.prompt)
    has_checks = bool(p.instruction_id_list)
    return {
        "key": p.key,
        "prompt": p.prompt,
        "response": response,
        "category": p.category,
        "reference": p.reference,
        "instruction_id_list": list(p.instruction_id_list),
        "strict": strict,
        "loose": loose,
        "prompt_strict": all(strict) if has_checks else None,
        "prompt_loose": all(loose) if has_checks else None,
        "unverified": unverified,
        "substituted": [i for i in p.instruction_id_list if i in SUBSTITUTES],
        "rougeL": rouge_l(p.reference, response) if p.reference is not None else None,
        "correct": answer_correct(p.answer, response) if p.answer is not None else None,
        "length": len(words(response)),
    }


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def distinct_2(responses: Sequence[str]) -> float | None:
    """Distinct word bigrams / all word bigrams, over all responses (lower-cased); None without bigrams.
    Bigrams do not cross from one response to the next."""
    seen: set[tuple[str, str]] = set()
    total = 0
    for response in responses:
        toks = [w.lower() for w in words(response)]
        pairs = list(zip(toks, toks[1:]))
        seen.update(pairs)
        total += len(pairs)
    return len(seen) / total if total else None


def summarize(results: Sequence[Mapping[str, Any]], finished: Sequence[bool] | None = None) -> dict[str, Any]:
    """Aggregate score_response results. IF metrics are None when no prompt has instructions."""
    if finished is not None and len(finished) != len(results):
        raise ValueError(f"finished has {len(finished)} entries for {len(results)} results")
    checked = [r for r in results if r["prompt_strict"] is not None]
    inst_strict = [x for r in checked for x in r["strict"]]
    inst_loose = [x for r in checked for x in r["loose"]]
    return {
        "n": len(results),
        "if_prompt_strict": _mean([float(r["prompt_strict"]) for r in checked]),
        "if_prompt_loose": _mean([float(r["prompt_loose"]) for r in checked]),
        "if_inst_strict": _mean([float(x) for x in inst_strict]),
        "if_inst_loose": _mean([float(x) for x in inst_loose]),
        "rougeL": _mean([r["rougeL"] for r in results if r["rougeL"] is not None]),
        "task_accuracy": _mean([float(r["correct"]) for r in results if r.get("correct") is not None]),
        "mean_length": _mean([r["length"] for r in results]),
        "distinct_2": distinct_2([r["response"] for r in results]),
        "eos_rate": _mean([float(bool(f)) for f in finished]) if finished is not None else None,
    }
