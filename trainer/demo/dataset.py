"""The embedded default dataset: seeded, templated instruction records a ~4M-parameter model can learn.

Seven base tasks (reverse a list of words, sort one of numbers, count the letters of a word, small
arithmetic, rewrite a sentence, list N items of a category, look a fact up in the tables below) are
combined, in 70% of records, with one or two of IFEval's verifiable constraints, phrased in the
instruction the way IFEval phrases them. The responses are written to satisfy them, and every one is
checked at generation time with `scoring.check_constraints`, so the generator and the scorer cannot
disagree.

Held out, never in training for any seed: one prompt in eight (by a hash of its text,
tasks.is_reserved_prompt) and a few (task, constraint combination) pairs. `build_heldout` draws the
eval_prompts files from exactly those, so no held-out prompt can equal a training prompt. Every word,
fact and operand pair is trained on (in other prompts), so a held-out prompt asks for content the model
can learn: each held-out row carries an `answer` (tasks.answer_text), which task accuracy checks.

Cost: 30,000 records take ~12 s on this project's two shared cores (fewer when they are idle), nearly
all of it langdetect inside the asserted case checks (see CONSTRAINT_WEIGHTS).

`python -m trainer.demo.dataset` rewrites eval_prompts/demo_ifeval.jsonl and demo_general.jsonl.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

from trainer.core import chat
from trainer.core.resources import data_path
from trainer.demo.tasks import (
    END_PHRASES,
    FILLERS,
    KEYWORDS,
    POOLS,
    TASK_WEIGHTS,
    TASKS,
    WORD_THRESHOLDS,
    Base,
    answer_text,
    is_reserved_prompt,
)
from trainer.evals import scoring

DEFAULT_RECORDS = 30000
HELDOUT_DIR = data_path("eval_prompts")
IFEVAL_FILE, GENERAL_FILE = "demo_ifeval.jsonl", "demo_general.jsonl"
HELDOUT_SEED = 20231107  # the held-out files do not depend on the training seed
CONSTRAINED_SHARE = 0.7

# ---- constraints ------------------------------------------------------------------------------------

LOWER, CAPITAL = "change_case:english_lowercase", "change_case:english_capital"
BULLETS, NO_COMMA = "detectable_format:number_bullet_lists", "punctuation:no_comma"
END, QUOTE = "startend:end_checker", "startend:quotation"
KEYWORDS_ID, TITLE = "keywords:existence", "detectable_format:title"
NUM_WORDS, JSON_ID = "length_constraints:number_words", "detectable_format:json_format"
CONSTRAINT_IDS = (LOWER, CAPITAL, BULLETS, NO_COMMA, END, QUOTE, KEYWORDS_ID, TITLE, NUM_WORDS, JSON_ID)
# The case checks run langdetect (milliseconds a call, most of the generation time), so they are drawn
# half as often as the others: still ~11% of constraints, more than their 8% share of IFEval's.
CONSTRAINT_WEIGHTS = (0.5, 0.5, 1, 1, 1, 1, 1, 1, 1, 1)

# Never in training, for any seed: these (task, constraint set) pairs are the held-out combinations.
RESERVED_COMBOS = frozenset({
    ("sort_list", frozenset({TITLE, CAPITAL})),
    ("reverse_list", frozenset({BULLETS, END})),
    ("list_items", frozenset({LOWER, QUOTE})),
    ("list_items", frozenset({NO_COMMA, NUM_WORDS})),
    ("arithmetic", frozenset({TITLE, KEYWORDS_ID})),
    ("lookup", frozenset({CAPITAL, END})),
    ("rewrite", frozenset({QUOTE, NUM_WORDS})),
    ("count_letters", frozenset({JSON_ID})),
})


def _compatible(ids: frozenset[str], is_list: bool) -> bool:
    if BULLETS in ids and not is_list:
        return False
    if LOWER in ids and CAPITAL in ids:
        return False
    # JSON wraps the whole answer in one string; only constraints on that string's words combine.
    return JSON_ID not in ids or ids <= {JSON_ID, KEYWORDS_ID, NO_COMMA}


def _phrase(instruction_id: str, kw: dict[str, Any]) -> str:
    """The constraint as the instruction states it, close to IFEval's own wording."""
    if instruction_id == BULLETS:
        return f"Your answer must contain exactly {kw['num_bullets']} bullet points in markdown format."
    if instruction_id == END:
        return f"Finish your response with this exact phrase: {kw['end_phrase']}"
    if instruction_id == KEYWORDS_ID:
        words = kw["keywords"]
        return (f"Include the keyword {words[0]} in the response." if len(words) == 1
                else f"Include the keywords {' and '.join(words)} in the response.")
    if instruction_id == NUM_WORDS:
        return f"Answer with {kw['relation']} {kw['num_words']} words."
    return {
        LOWER: "Your entire response should be in English and in all lowercase letters.",
        CAPITAL: "Your entire response should be in English and in all capital letters.",
        NO_COMMA: "Do not use any commas in your response.",
        QUOTE: "Wrap your entire response with double quotation marks.",
        TITLE: "Your answer must contain a title wrapped in double angular brackets, such as <<my title>>.",
        JSON_ID: "Wrap your entire output in JSON format.",
    }[instruction_id]


# ---- rendering --------------------------------------------------------------------------------------


def _render(base: Base, ids: frozenset[str], kw: dict[str, dict[str, Any]], fillers: int) -> str:
    joiner = "\n" if BULLETS in ids else " "
    if not base.items:
        text = base.lead
    elif BULLETS in ids:
        text = base.lead + "\n" + "\n".join(f"* {item}" for item in base.items)
    else:
        # A comma-free answer separates items with semicolons instead.
        text = base.lead + " " + ("; " if NO_COMMA in ids else ", ").join(base.items) + "."
    extra = []
    if KEYWORDS_ID in ids:
        extra.append(f"This answer mentions {' and '.join(kw[KEYWORDS_ID]['keywords'])}.")
    extra += [FILLERS[i % len(FILLERS)] for i in range(fillers)]
    if END in ids:
        extra.append(kw[END]["end_phrase"])
    text = joiner.join([text, *extra])
    if TITLE in ids:
        text = f"<<{base.title}>>\n{text}"
    if LOWER in ids:
        text = text.lower()
    if CAPITAL in ids:
        text = text.upper()
    if QUOTE in ids:
        text = f'"{text}"'
    if JSON_ID in ids:
        text = json.dumps({"answer": text})
    return text


def _choose_kwargs(rng: random.Random, base: Base, ids: frozenset[str]) -> dict[str, dict[str, Any]]:
    kw: dict[str, dict[str, Any]] = {i: {} for i in ids}
    if BULLETS in ids:
        kw[BULLETS] = {"num_bullets": len(base.items)}
    if END in ids:
        kw[END] = {"end_phrase": rng.choice(END_PHRASES)}
    if KEYWORDS_ID in ids:
        kw[KEYWORDS_ID] = {"keywords": sorted(rng.sample(KEYWORDS, rng.randint(1, 2)))}
    return kw


def _respond(rng: random.Random, base: Base, ids: frozenset[str]) -> tuple[str, dict[str, dict[str, Any]]]:
    """The response and each constraint's kwargs; a word-count limit is set from the plain response."""
    kw = _choose_kwargs(rng, base, ids)
    if NUM_WORDS not in ids:
        return _render(base, ids, kw, 0), kw
    count = len(scoring.words(_render(base, ids, kw, 0)))
    if rng.random() < 0.5:
        limit = rng.choice([t for t in WORD_THRESHOLDS if t > count][:3])
        kw[NUM_WORDS] = {"relation": "less than", "num_words": limit}
        return _render(base, ids, kw, 0), kw
    limit = rng.choice([t for t in WORD_THRESHOLDS if t >= count + 4][:2])
    kw[NUM_WORDS] = {"relation": "at least", "num_words": limit}
    fillers = 1
    while len(scoring.words(_render(base, ids, kw, fillers))) < limit:
        fillers += 1
    return _render(base, ids, kw, fillers), kw


def _make(rng: random.Random, base: Base, ids: frozenset[str]) -> dict[str, Any] | None:
    """One example: its instruction text, input, response, and the constraints it satisfies; None when
    the case checks' language detector does not take this short answer for English (redraw it)."""
    response, kw = _respond(rng, base, ids)
    order = [i for i in CONSTRAINT_IDS if i in ids]
    rng.shuffle(order)
    instruction = " ".join([base.instruction, *(_phrase(i, kw[i]) for i in order)])
    kwargs = [kw[i] for i in order]
    example = {"instruction": instruction, "input": base.input, "output": response,
               "task": base.task, "instruction_id_list": order, "kwargs": kwargs}
    verdicts = scoring.check_constraints(order, kwargs, response, prompt_text(example))
    failed = {i for i, ok in zip(order, verdicts) if not ok}
    # langdetect reads an all-caps word by its first letter only, so it often misses that a short
    # upper-case (and sometimes lower-case) answer is English; such items are redrawn, not kept.
    if failed and failed <= {LOWER, CAPITAL} and (response.isupper() if CAPITAL in ids else response.islower()):
        return None
    if failed:
        raise AssertionError(f"demo response fails its own constraints {failed}: {response!r}")
    return example


def _draw_constraints(rng: random.Random, base: Base, count: int) -> frozenset[str]:
    while True:
        ids: set[str] = set()
        while len(ids) < count:
            ids.add(rng.choices(CONSTRAINT_IDS, weights=CONSTRAINT_WEIGHTS)[0])
        if _compatible(frozenset(ids), bool(base.items)):
            return frozenset(ids)


def _constraint_count(rng: random.Random) -> int:
    return 0 if rng.random() >= CONSTRAINED_SHARE else rng.choice((1, 1, 2))


def prompt_text(record: dict[str, Any]) -> str:
    """The user message of a record: instruction, then input after a blank line when there is one."""
    return chat.prompt_text(record["instruction"], record.get("input") or "")


def build_examples(n: int = DEFAULT_RECORDS, seed: int = 0) -> list[dict[str, Any]]:
    """The training records with what made them: "task", "instruction_id_list" and "kwargs" as well."""
    rng = random.Random(seed)
    tasks = sorted(TASKS)
    examples: list[dict[str, Any]] = []
    while len(examples) < n:
        base = TASKS[rng.choices(tasks, weights=[TASK_WEIGHTS[t] for t in tasks])[0]](rng, POOLS)
        ids = _draw_constraints(rng, base, _constraint_count(rng))
        if (base.task, ids) in RESERVED_COMBOS:
            continue
        example = _make(rng, base, ids)
        if example is not None and not is_reserved_prompt(prompt_text(example)):
            examples.append(example)
    return examples


def build_records(n: int = DEFAULT_RECORDS, seed: int = 0) -> list[dict[str, str]]:
    """`n` training records {"instruction", "input", "output"}, the same for the same seed."""
    return [{k: e[k] for k in ("instruction", "input", "output")} for e in build_examples(n, seed)]


def _row(key: str, example: dict[str, Any], with_checks: bool, base: Base) -> dict[str, Any]:
    row: dict[str, Any] = {"key": key, "prompt": prompt_text(example)}
    if with_checks:
        row["instruction_id_list"] = example["instruction_id_list"]
        row["kwargs"] = example["kwargs"]
    answer = answer_text(base)
    if answer is not None:  # list_items answers are one pick among many: no reference, no answer
        row["reference"] = example["output"]
        row["answer"] = answer
    row["category"] = example["task"]
    return row


def build_heldout(n_ifeval: int = 150, n_general: int = 50, seed: int = HELDOUT_SEED
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows of eval_prompts/demo_ifeval.jsonl and demo_general.jsonl (the README's "Held-out prompts and scores").

    IFEval-style rows carry 1-2 constraints and are held out by a reserved (task, constraint set) pair
    (half of them) or by a reserved prompt (tasks.is_reserved_prompt); general rows have no constraints
    and a reserved prompt. Rows other than list_items carry a reference and an answer. IFEval-style
    rows take the tasks in turn, so each is equally represented; general rows draw theirs at random
    (a lookup or a letter count has only a handful of reserved bare prompts).
    """
    rng = random.Random(seed)
    tasks = sorted(TASKS)
    answered = [t for t in tasks if t != "list_items"]  # general rows are scored by their reference
    combos = sorted(RESERVED_COMBOS, key=lambda c: (c[0], sorted(c[1])))
    seen: set[str] = set()
    ifeval: list[dict[str, Any]] = []
    general: list[dict[str, Any]] = []
    for _attempt in range(100 * (n_ifeval + n_general)):
        if len(ifeval) < n_ifeval and len(ifeval) % 2 == 0:
            task, ids = rng.choice(combos)
            base = TASKS[task](rng, POOLS)
        elif len(ifeval) < n_ifeval:
            base = TASKS[tasks[len(ifeval) // 2 % len(tasks)]](rng, POOLS)
            ids = _draw_constraints(rng, base, rng.choice((1, 2)))
        elif len(general) < n_general:
            base = TASKS[rng.choice(answered)](rng, POOLS)  # some tasks have few bare prompts
            ids = frozenset()
        else:
            break
        example = _make(rng, base, ids)
        if example is None or _normalise(prompt_text(example)) in seen:
            continue
        if (base.task, ids) not in RESERVED_COMBOS and not is_reserved_prompt(prompt_text(example)):
            continue
        seen.add(_normalise(prompt_text(example)))
        if ids:
            ifeval.append(_row(f"demo-ifeval-{len(ifeval) + 1:03d}", example, True, base))
        else:
            general.append(_row(f"demo-general-{len(general) + 1:03d}", example, False, base))
    else:
        raise RuntimeError("build_heldout: the reserved prompts are too few for the rows asked for")
    return ifeval, general


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def write_heldout(folder: Path = HELDOUT_DIR) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in zip((IFEVAL_FILE, GENERAL_FILE), build_heldout()):
        path = folder / name
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    folder = Path(argv[0]) if argv else HELDOUT_DIR
    for path in write_heldout(folder):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
