"""Scores for held-out responses: IFEval's checks (strict and loose), ROUGE-L, length and repetition.

The IFEval checks are if-verifiable's copies of Google's checkers (`if_verifiable.ifeval`), driven the
way google-research's `instruction_following_eval/evaluation_lib.py` drives them
(`test_instruction_following_strict` / `_loose`): kwargs with None values dropped, the prompt handed
to `build_description` when a checker asks for it, a response that is empty or whitespace fails, and
loose passes when any of eight variants of the response passes (as is, without `*`, without its first
line, last line or both, and those three without `*`).

Sentence tokenizer: NLTK's *untrained* `PunktSentenceTokenizer()`, always.
if-verifiable splits sentences with `nltk.data.load("nltk:tokenizers/punkt/english.pickle")`
(`length_constraints:number_sentences`) and words with `nltk.word_tokenize`
(`change_case:capital_word_frequency`); with NLTK >= 3.9 both need the `punkt_tab` data package,
which pip does not install and NLTK's downloader cannot fetch here. The untrained tokenizer ships
inside nltk itself, so scoring works on a fresh machine from `pip install` alone, needs no new
dependency (rather than a third-party wheel of NLTK data), and gives the same numbers on every
machine whether or not someone has punkt_tab installed. It is the configuration behind the loose
figures in shared/data/README.md. Untrained Punkt knows no abbreviations, so it can count
"Dr. Smith" as two sentences where the trained model would not. It is patched into if-verifiable's
`instructions_util` module only, not into nltk globally.

Substituted kwargs: IFEval's checker draws a random letter when a prompt's `letter` kwarg is not a
letter (IFEval prompts 1122 and 1129); the published figures are one such draw; we fix the seed to a
draw that reproduces them, so scores are repeatable and comparable with the paper. Every checker is
built under `random.seed(_BUILD_SEED)`, which draws "p": GPT-4's responses then fail 1122 and pass
1129, as in the paper's run (any of c, g, h, p, u, v, w would), and score strict 76.89 / 83.57 (the
paper's, exactly) and loose 79.48 / 85.61 (paper 79.30 / 85.37); tests/test_scoring.py checks them.
Strict and loose use the same built checker, so the same letter. A check that ran on a substituted
value is listed in score_response's "unverified": we find them by comparing the given kwargs with the
built checker's `get_instruction_args()`, up to the normalisation checkers apply (strings stripped and
lower-cased, lists sorted and de-duplicated). The seed also fixes draws for kwargs not given at all
(load_prompts requires them; check_constraints does not). langdetect (change_case and language
checks) is seeded too.
"""

from __future__ import annotations

import functools
import json
import random
import re
import types
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainer.prompts import HeldoutPrompt

# IFEval counts words as runs of \w (instructions_util.count_words); `length` uses the same rule so
# that it agrees with length_constraints:number_words.
_WORD = re.compile(r"\w+")

# The summary metrics every report shows, in this order (design.md section 4); summarize() also gives
# n, mean_length, distinct_2 and eos_rate.
SUMMARY_METRICS = ("if_prompt_strict", "if_prompt_loose", "if_inst_strict", "if_inst_loose", "rougeL")
IF_METRICS = SUMMARY_METRICS[:4]  # IFEval's four: prompt- and instruction-level, strict and loose

# Seed for every checker build. random.seed(3) makes the letter check's draw "p" (see the docstring):
# the draw that reproduces IFEval's published GPT-4 figures. Changing it changes IFEval scores.
_BUILD_SEED = 3


@functools.cache
def _sentence_tokenizer() -> Any:
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    return PunktSentenceTokenizer()


@functools.cache
def _treebank_tokenizer() -> Any:
    from nltk.tokenize.destructive import NLTKWordTokenizer

    return NLTKWordTokenizer()


def _word_tokenize(text: str) -> list[str]:
    """nltk.word_tokenize with the untrained sentence splitter in place of punkt_tab."""
    return [tok for sent in _sentence_tokenizer().tokenize(text) for tok in _treebank_tokenizer().tokenize(sent)]


class _OfflineNltk:
    """Stands in for the `nltk` name inside if-verifiable's instructions_util: the real module, except
    that `word_tokenize` splits sentences with the untrained Punkt instead of loading punkt_tab."""

    word_tokenize = staticmethod(_word_tokenize)

    def __init__(self, nltk_module: types.ModuleType) -> None:
        self._nltk = nltk_module

    def __getattr__(self, name: str) -> Any:
        if name == "_nltk":  # not set yet: avoid recursing
            raise AttributeError(name)
        return getattr(self._nltk, name)


@functools.cache
def instruction_registry() -> Mapping[str, type]:
    """IFEval's instruction id -> checker class, with the offline sentence tokenizer installed."""
    import langdetect
    import nltk
    from if_verifiable.ifeval import instructions_util
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    instructions_util._get_sentence_tokenizer = _sentence_tokenizer
    instructions_util.nltk = _OfflineNltk(nltk)
    langdetect.DetectorFactory.seed = 0
    return INSTRUCTION_DICT


@functools.cache
def _arg_keys(instruction_id: str) -> tuple[str, ...]:
    return tuple(instruction_registry()[instruction_id](instruction_id).get_instruction_args_keys())


def required_kwargs(instruction_id: str) -> list[str]:
    """The kwargs a checker needs; without them its build_description picks random values."""
    return [k for k in _arg_keys(instruction_id) if k != "prompt"]


def build_checker(instruction_id: str, kwargs: Mapping[str, Any] | None = None, prompt: str = "") -> Any:
    """A built IFEval checker, cached. Raises KeyError for an unknown id and whatever the checker's
    build_description raises (TypeError, ValueError, ...) for kwargs it rejects."""
    return _build(instruction_id, kwargs, prompt)[0]


def unhonoured_kwargs(instruction_id: str, kwargs: Mapping[str, Any] | None = None, prompt: str = "") -> list[str]:
    """The given kwargs that the checker replaced with values of its own (e.g. letter "#", which
    keywords:letter_frequency swaps for a seeded random letter). Raises as build_checker does."""
    return list(_build(instruction_id, kwargs, prompt)[1])


def _build(instruction_id: str, kwargs: Mapping[str, Any] | None, prompt: str) -> tuple[Any, tuple[str, ...]]:
    clean = {k: v for k, v in (kwargs or {}).items() if v is not None}
    # The prompt is part of the cache key only for the checkers that read it.
    needs_prompt = "prompt" in _arg_keys(instruction_id)
    return _build_checker(instruction_id, json.dumps(clean, sort_keys=True), prompt if needs_prompt else "")


def _normalised(value: Any) -> Any:
    """A kwarg value as the checkers store it: strings stripped (and lower-cased, as the letter and
    first-word checks do), lists sorted and de-duplicated (keywords, forbidden words)."""
    if isinstance(value, str):
        return value.strip().lower()
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_normalised(v) for v in value]
        try:
            return tuple(sorted(set(items), key=repr))
        except TypeError:  # unhashable items: keep them as a list
            return items
    return value


@functools.lru_cache(maxsize=8192)
def _build_checker(instruction_id: str, kwargs_json: str, prompt: str) -> tuple[Any, tuple[str, ...]]:
    checker = instruction_registry()[instruction_id](instruction_id)
    given = json.loads(kwargs_json)
    # A checker given a value it cannot use (IFEval's prompts 1122 and 1129 pass letters "#" and "!")
    # or none draws one from the global `random`. The fixed seed makes those draws, and so every
    # score, the same on every run, and the same draw as the paper's (see the module docstring).
    # The caller's random state is kept.
    state = random.getstate()
    random.seed(_BUILD_SEED)
    try:
        checker.build_description(**given)
        if prompt:
            checker.build_description(prompt=prompt)
    finally:
        random.setstate(state)
    built = checker.get_instruction_args() or {}
    unhonoured = tuple(k for k, v in given.items() if k in built and _normalised(v) != _normalised(built[k]))
    return checker, unhonoured


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
        checker, unhonoured = _build(instruction_id, kw, prompt)
        if unhonoured:
            unverified.append(instruction_id)
        strict_verdicts.append(_follows(checker, response))
        if loose:
            loose_verdicts.append(any(_follows(checker, v) for v in variants))
    return strict_verdicts, loose_verdicts, unverified


def check_constraints(instruction_id_list: Sequence[str], kwargs: Sequence[Mapping[str, Any]] | None,
                      response: str, prompt: str = "") -> list[bool]:
    """Strict IFEval verdict per instruction."""
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


def score_response(p: HeldoutPrompt, response: str) -> dict[str, Any]:
    """Per-prompt scores; prompt_strict/loose are None when the prompt carries no instructions.
    "unverified" lists the instruction ids checked with a value the checker substituted for the one
    given (IFEval's 1122 and 1129: a seeded random letter for a non-letter); empty otherwise."""
    strict, loose, unverified = _check(p.instruction_id_list, p.kwargs, response, p.prompt)
    has_checks = bool(p.instruction_id_list)
    return {
        "key": p.key,
        "prompt": p.prompt,
        "response": response,
        "category": p.category,
        "instruction_id_list": list(p.instruction_id_list),
        "strict": strict,
        "loose": loose,
        "prompt_strict": all(strict) if has_checks else None,
        "prompt_loose": all(loose) if has_checks else None,
        "unverified": unverified,
        "rougeL": rouge_l(p.reference, response) if p.reference is not None else None,
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
        "mean_length": _mean([r["length"] for r in results]),
        "distinct_2": distinct_2([r["response"] for r in results]),
        "eos_rate": _mean([float(bool(f)) for f in finished]) if finished is not None else None,
    }
