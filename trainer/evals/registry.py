"""The instruction registry: IFEval's and IFBench's checkers (if-verifiable's copies of Google's and
AllenAI's), one id space, with look-up, kwargs, and seeded, cached, thread-safe checker builds.

Which benchmark checks an instruction is decided by its id alone: IFEval's ids
(`punctuation:no_comma`, ...) go to `if_verifiable.ifeval`, IFBench's 58 (`count:keywords_multiple`,
...) to `if_verifiable.ifbench`; the two id sets do not overlap, and IFEval's would win if they did.
A prompt file may hold either or both.

Offline NLTK data. The checkers load four NLTK data packages that pip does not install and NLTK's
downloader cannot fetch here; each is replaced, always (whether or not the data is installed, so the
numbers are the same on every machine), with an equivalent that ships with this module or with nltk
itself. No new dependency, never a LookupError. The checks that run on a substitute are SUBSTITUTES
below, and score_response lists them per prompt in "substituted".

- punkt (`nltk.data.load("nltk:tokenizers/punkt/english.pickle")`, IFEval's sentence counter) and
  punkt_tab (inside `nltk.word_tokenize`, which splits sentences before Treebank word splitting):
  NLTK's *untrained* `PunktSentenceTokenizer()`, which ships inside nltk. It is the configuration
  behind the loose IFEval figures that tests/test_scoring.py checks. It knows no abbreviations, so it
  can count "Dr. Smith" as two sentences where the trained model would not; for word tokenizing it
  only decides where a sentence-final period is split off. Affects IFEval's
  length_constraints:number_sentences and change_case:capital_word_frequency, and IFBench's
  words:start_verb, words:keywords_specific_position, words:words_position and format:title_case.
- stopwords (`nltk.corpus.stopwords.words("english")`, IFBench's ratio:stop_words): NLTK's English
  list, embedded below (_STOPWORDS, the 179 words of the corpus). The checker counts `\\w+` tokens, so
  a list entry with an apostrophe never matches anything: later versions of the corpus that only add
  contractions ("he'd", "i'm", ...) give the same counts.
- averaged_perceptron_tagger_eng (`nltk.pos_tag`, IFBench's words:start_verb: "the first token's tag
  contains VB"): a rule instead of a tagger (_starts_with_verb). The first token counts as a verb
  unless it is not a word (punctuation, a number, markdown), a closed-class word (article, pronoun,
  preposition, conjunction, modal, question word, one of the usual non-verb openers: "Sure", "Here",
  "Yes", "Dear", ...) or an -ly adverb. This is coarser than the tagger: a response that starts with a
  noun, adjective or name ("Galois theory ...", "Quantum ...") passes where the tagger would fail it;
  a response that starts with a verb passes with both.

One crash fixed: IFBench's format:quote_unquote ("no two quotes side by side, no quote at the end")
strips digits and punctuation from the end and indexes the last character left, so a response made
only of those ("...", "1.") raises IndexError and would stop a whole evaluation. Here such a response
follows the rule, as it has no quote to end with; every other response is judged as upstream judges it.

Quiet checkers: IFEval's language checks (language:response_language, change_case:english_capital)
log `logging.error("Unable to detect language for text ...")` on the root logger whenever langdetect
finds no features (a response of digits or punctuation) and count the instruction as followed; on an
unconfigured root logger that call also installs a stderr handler, so every such response printed
its whole text as an "ERROR:root:" line. That is a verdict, not an error: the module's `logging`
name is replaced by _DebugLogging, which sends those calls to the "if_verifiable" logger at DEBUG.
The root logger, its level and its handlers are left as they are.

The substitutes are patched into if-verifiable's modules only (their `nltk` name, their sentence
splitter and stop-word counter; subclasses of the start-verb and quote_unquote checkers in our
registry, not theirs), never into nltk globally.
IFBench's instructions_util calls `nltk.download` for all four packages when it is imported; that
import runs with `nltk.download` replaced by a no-op (under _INSTALL_LOCK), so importing never
reaches for the network or prints download errors.

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
checks) is seeded too. IFBench's repeat:repeat_span reads `if not n_start`, so an n_start of 0 (its
test prompt 286) is replaced by a seeded draw, and listed as unverified.

Thread safety: the front ends score from several threads at once. The offline substitutes are
installed once, under a lock, into if-verifiable's modules (not into nltk); every build that seeds
the global `random` holds _BUILD_LOCK from seeding to restoring the caller's state, so no other
thread's draw lands in between.
"""

from __future__ import annotations

import functools
import json
import random
import re
import threading
import types
from collections.abc import Mapping
from typing import Any

_INSTALL_LOCK = threading.Lock()
_BUILD_LOCK = threading.Lock()

# Seed for every checker build. random.seed(3) makes the letter check's draw "p" (see the docstring):
# the draw that reproduces IFEval's published GPT-4 figures. Changing it changes IFEval scores.
_BUILD_SEED = 3

_PUNKT = "untrained Punkt sentence splitter (for NLTK's punkt_tab)"
SUBSTITUTES: Mapping[str, str] = {
    "length_constraints:number_sentences": "untrained Punkt sentence splitter (for NLTK's punkt)",
    "change_case:capital_word_frequency": _PUNKT,
    "ratio:stop_words": "embedded NLTK English stop-word list (for NLTK's stopwords corpus)",
    "words:start_verb": "first-word verb rule (for NLTK's averaged_perceptron_tagger_eng) and " + _PUNKT,
    "words:keywords_specific_position": _PUNKT,
    "words:words_position": _PUNKT,
    "format:title_case": _PUNKT,
}
"""Instruction id -> the offline stand-in its check runs on, for every check that needs NLTK data."""

# NLTK's English stop-word list (the stopwords corpus, english, 179 words), in the corpus's order.
_STOPWORDS = frozenset("""
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he him
his himself she she's her hers herself it it's its itself they them their theirs themselves what which who
whom this that that'll these those am is are was were be been being have has had having do does did doing
a an the and but if or because as until while of at by for with about against between into through during
before after above below to from up down in out on off over under again further then once here there when
where why how all any both each few more most other some such no nor not only own same so than too very s
t can will just don don't should should've now d ll m o re ve y ain aren aren't couldn couldn't didn
didn't doesn doesn't hadn hadn't hasn hasn't haven haven't isn isn't ma mightn mightn't mustn mustn't
needn needn't shan shan't shouldn shouldn't wasn wasn't weren weren't won won't wouldn wouldn't
""".split())

# First words that are never verbs (the tagger gives them DT, PRP, IN, CC, MD, WP, RB, UH, ... tags).
_NOT_VERBS = frozenset("""
a an the this that these those each every some any no all both either neither another such what which
whose who whom why how where when whenever wherever whether i you he she it we they me him her us them my
your his its our their mine yours hers ours theirs myself yourself himself herself itself ourselves
themselves one someone everyone anyone nobody nothing everything something anything in on at by for with
about against between into through during before after above below to from up down out off over under of
as like among across along around behind beyond despite near since toward towards upon within without amid
via per than and but or nor so yet because although though while whereas if unless until once can could
will would shall should may might must here there now then today tomorrow yesterday yes not sure
certainly absolutely indeed however also well oh hello hi hey dear okay ok great thanks first second third
finally overall perhaps maybe often always never sometimes just only even still very really too again
already actually instead otherwise meanwhile therefore thus hence furthermore moreover additionally title
""".split())

# -ly words that are verbs, not adverbs.
_LY_VERBS = frozenset("apply comply imply multiply reply supply rely rally tally bully fly ally sully".split())
_WORD_RE = re.compile(r"[A-Za-z][A-Za-z'-]*")


def _starts_with_verb(tokens: list[str]) -> bool:
    """The offline stand-in for IFBench's `"VB" in nltk.pos_tag(tokens)[0][1]` (see the docstring)."""
    if not tokens or not _WORD_RE.fullmatch(tokens[0]):
        return False
    word = tokens[0].lower()
    if word in _NOT_VERBS:
        return False
    return not (word.endswith("ly") and len(word) > 4 and word not in _LY_VERBS and not word.endswith("ply"))


def _count_stopwords(text: str) -> int:
    """IFBench's instructions_util.count_stopwords with the embedded list in place of the corpus."""
    return sum(1 for t in re.findall(r"\w+", text) if t.lower() in _STOPWORDS)


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
    """Stands in for the `nltk` name inside if-verifiable's checker modules: the real module, except
    that `word_tokenize` splits sentences with the untrained Punkt instead of loading punkt_tab."""

    word_tokenize = staticmethod(_word_tokenize)

    def __init__(self, nltk_module: types.ModuleType) -> None:
        self._nltk = nltk_module

    def __getattr__(self, name: str) -> Any:
        if name == "_nltk":  # not set yet: avoid recursing
            raise AttributeError(name)
        return getattr(self._nltk, name)


class _DebugLogging:
    """Stands in for the `logging` module inside if-verifiable's IFEval checkers: its module-level
    calls (logging.error, ...) go to the "if_verifiable" logger at DEBUG, not to the root logger."""

    def __init__(self, logging_module: types.ModuleType) -> None:
        self._logging = logging_module
        self._log = logging_module.getLogger("if_verifiable")

    def _debug(self, msg: object, *args: Any, **kwargs: Any) -> None:
        self._log.debug(msg, *args, **kwargs)

    debug = info = warning = warn = error = exception = critical = _debug

    def log(self, _level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        self._debug(msg, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "_logging":  # not set yet: avoid recursing
            raise AttributeError(name)
        return getattr(self._logging, name)


@functools.cache
def instruction_registry() -> Mapping[str, type]:
    """Instruction id -> checker class, IFEval's and IFBench's, with the offline substitutes installed."""
    with _INSTALL_LOCK:
        return _install()


def benchmark(instruction_id: str) -> str:
    """"ifeval" or "ifbench": whose checker an id (one in instruction_registry()) runs."""
    return "ifeval" if instruction_id in _ifeval_ids() else "ifbench"


@functools.cache
def _ifeval_ids() -> frozenset[str]:
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    return frozenset(INSTRUCTION_DICT)


def _no_download(*_args: Any, **_kwargs: Any) -> bool:
    return False


def _install() -> Mapping[str, type]:
    import logging

    import langdetect
    import nltk
    from if_verifiable.ifeval import instructions as ifeval_instructions
    from if_verifiable.ifeval import instructions_util
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT as IFEVAL

    ifeval_instructions.logging = _DebugLogging(logging)
    instructions_util._get_sentence_tokenizer = _sentence_tokenizer
    instructions_util.nltk = _OfflineNltk(nltk)
    langdetect.DetectorFactory.seed = 0

    # IFBench's instructions_util downloads its NLTK data when imported: keep that import offline.
    download, nltk.download = nltk.download, _no_download
    try:
        from if_verifiable.ifbench import instructions as ifbench_instructions
        from if_verifiable.ifbench import instructions_util as ifbench_util
        from if_verifiable.ifbench.instructions_registry import (
            INSTRUCTION_DICT as IFBENCH,
        )
    finally:
        nltk.download = download
    ifbench_util._get_sentence_tokenizer = _sentence_tokenizer
    ifbench_util.count_stopwords = _count_stopwords
    ifbench_util.nltk = _OfflineNltk(nltk)
    ifbench_instructions.nltk = _OfflineNltk(nltk)

    class StartWithVerbOffline(IFBENCH["words:start_verb"]):
        """words:start_verb with _starts_with_verb in place of NLTK's perceptron tagger."""

        def check_following(self, value: str) -> bool:
            return _starts_with_verb(_word_tokenize(value))

    class QuoteUnquoteNoCrash(IFBENCH["format:quote_unquote"]):
        """format:quote_unquote without the IndexError on nothing but digits and punctuation."""

        def check_following(self, value: str) -> bool:
            try:
                return super().check_following(value)
            except IndexError:  # nothing left after stripping digits and punctuation: no quote at the end
                return True

    fixed = {"words:start_verb": StartWithVerbOffline, "format:quote_unquote": QuoteUnquoteNoCrash}
    # IFEval's entries last: they win a clash (there is none in if-verifiable 0.1.2).
    return types.MappingProxyType({**IFBENCH, **fixed, **IFEVAL})


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


def build_and_unhonoured(instruction_id: str, kwargs: Mapping[str, Any] | None = None,
                         prompt: str = "") -> tuple[Any, tuple[str, ...]]:
    """(build_checker's checker, unhonoured_kwargs's names) from one cached build."""
    return _build(instruction_id, kwargs, prompt)


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
    with _BUILD_LOCK:
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
