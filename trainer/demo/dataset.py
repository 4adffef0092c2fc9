"""The embedded default dataset: seeded, templated instruction records a ~4M-parameter model can learn.

Seven base tasks (reverse or sort a list, count the letters of a word, small arithmetic, rewrite a
sentence, list N items of a category, look a fact up in the tables below) are combined, in 70% of
records, with one or two of IFEval's verifiable constraints, phrased in the instruction the way IFEval
phrases them. The responses are written to satisfy them, and every one is checked at generation time
with `scoring.check_constraints`, so the generator and the scorer cannot disagree.

Held out, never in training for any seed: every fifth word of the vocabulary (and so the table rows
that name one), every fifth country, some arithmetic operand pairs, and a few (task, constraint
combination) pairs. `build_heldout` draws the eval_prompts files from exactly those, so no held-out
prompt can equal a training prompt.

Cost: 30,000 records take ~12 s on this project's two shared cores (fewer when they are idle), nearly
all of it langdetect inside the asserted case checks (see CONSTRAINT_WEIGHTS).

`python -m trainer.demo.dataset` rewrites eval_prompts/demo_ifeval.jsonl and demo_general.jsonl.
"""

from __future__ import annotations

import json
import random
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.core import chat
from trainer.core.resources import data_path
from trainer.evals import scoring

DEFAULT_RECORDS = 30000
HELDOUT_DIR = data_path("eval_prompts")
IFEVAL_FILE, GENERAL_FILE = "demo_ifeval.jsonl", "demo_general.jsonl"
HELDOUT_SEED = 20231107  # the held-out files do not depend on the training seed
CONSTRAINED_SHARE = 0.7

# ---- vocabulary and fact tables -------------------------------------------------------------------

CATEGORIES: dict[str, tuple[str, ...]] = {
    "fruits": ("apple", "banana", "cherry", "grape", "lemon", "lime", "mango", "melon", "peach", "pear",
               "plum", "kiwi", "fig", "coconut", "apricot", "papaya"),
    "animals": ("cat", "dog", "cow", "horse", "sheep", "goat", "pig", "duck", "lion", "tiger", "bear",
                "wolf", "fox", "owl", "frog", "mouse", "bee", "snake", "donkey", "hen"),
    "colours": ("red", "blue", "green", "yellow", "pink", "purple", "brown", "black", "white", "grey",
                "gold", "silver"),
    "tools": ("hammer", "spoon", "knife", "brush", "saw", "drill", "ladder", "shovel", "rake", "needle",
              "rope", "bucket"),
}
VOCABULARY = tuple(sorted({w for words in CATEGORIES.values() for w in words}))

CAPITALS = {
    "France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Japan": "Tokyo",
    "Egypt": "Cairo", "Peru": "Lima", "Kenya": "Nairobi", "Norway": "Oslo", "Greece": "Athens",
    "Canada": "Ottawa", "China": "Beijing", "Russia": "Moscow", "Cuba": "Havana", "Chile": "Santiago",
    "Poland": "Warsaw", "Ireland": "Dublin", "Austria": "Vienna", "Portugal": "Lisbon",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Thailand": "Bangkok", "Turkey": "Ankara",
    "Hungary": "Budapest", "Denmark": "Copenhagen",
}
FRUIT_COLOURS = {
    "banana": "yellow", "lemon": "yellow", "lime": "green", "cherry": "red", "plum": "purple",
    "grape": "purple", "kiwi": "brown", "apple": "red", "pear": "green", "coconut": "brown",
    "fig": "purple", "melon": "green", "mango": "yellow", "peach": "pink", "apricot": "yellow",
    "papaya": "green",
}
ANIMAL_SOUNDS = {
    "cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa", "pig": "oink",
    "horse": "neigh", "lion": "roar", "owl": "hoot", "frog": "croak", "bee": "buzz", "snake": "hiss",
    "mouse": "squeak", "goat": "bleat", "wolf": "howl", "donkey": "bray", "hen": "cluck", "bear": "growl",
}
# (singular, plural) subjects and (present, past, plural present) verbs for the rewrite task.
SUBJECTS = {"cat": "cats", "dog": "dogs", "mouse": "mice", "sheep": "sheep", "wolf": "wolves",
            "fox": "foxes", "goat": "goats", "duck": "ducks", "horse": "horses", "bear": "bears",
            "owl": "owls", "frog": "frogs"}
VERBS = (("chases", "chased", "chase"), ("sees", "saw", "see"), ("finds", "found", "find"),
         ("likes", "liked", "like"), ("watches", "watched", "watch"), ("follows", "followed", "follow"),
         ("carries", "carried", "carry"), ("eats", "ate", "eat"))
OBJECTS = ("the ball", "a small stone", "the old tree", "a long stick", "the farmer", "the green door",
           "a little boat", "the river")

KEYWORDS = ("sun", "moon", "river", "cloud", "garden", "music", "winter", "story", "light", "friend",
            "dream", "summer", "forest", "island", "paper", "window")
END_PHRASES = ("Is there anything else I can help with?", "Any other questions?", "Hope this helps.",
               "That is all.", "Let me know if you need more.", "Have a nice day.")
FILLERS = ("I hope this answer helps you.", "This is a short and simple answer.",
           "Thank you for the question.", "Please ask again if anything is unclear.",
           "It was a pleasure to help with this.")
WORD_THRESHOLDS = (10, 15, 20, 25, 30, 35, 40, 50, 60, 80, 100)


def _every_fifth(items: list[str]) -> frozenset[str]:
    return frozenset(sorted(items)[2::5])


RESERVED_WORDS = _every_fifth(list(VOCABULARY))
RESERVED_COUNTRIES = _every_fifth(list(CAPITALS))


def _reserved_operands(a: int, b: int) -> bool:
    # Symmetric, because "minus" swaps its operands to stay non-negative.
    return (a + b + a * b) % 9 == 4


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


# ---- base tasks -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Base:
    """A task item before constraints: the request and the plain answer."""

    task: str
    """Category name of the base task."""
    instruction: str
    """The request, without constraint sentences."""
    input: str
    """The data the request is about ("" when the instruction holds it)."""
    lead: str
    """The answer sentence, or the lead-in before a list of items."""
    items: tuple[str, ...] = ()
    """A list answer's items (empty for a sentence answer)."""
    title: str = "answer"
    """What a <<title>> says."""


@dataclass(frozen=True)
class Pools:
    """What a generator may draw from: the training or the held-out side of the split."""

    words: tuple[str, ...]
    countries: tuple[str, ...]
    operands: tuple[tuple[int, int], ...]


def _reverse(rng: random.Random, pools: Pools) -> Base:
    items = rng.sample(pools.words, rng.randint(3, 5))
    return Base("reverse_list", rng.choice(("Reverse the order of this list.", "Write this list backwards.")),
                ", ".join(items), "The reversed list is:", tuple(reversed(items)), "reversed list")


def _sort(rng: random.Random, pools: Pools) -> Base:
    items = rng.sample(pools.words, rng.randint(3, 5))
    return Base("sort_list", rng.choice(("Sort these words in alphabetical order.",
                                         "Put this list in alphabetical order.")),
                ", ".join(items), "The sorted list is:", tuple(sorted(items)), "sorted list")


def _count_letters(rng: random.Random, pools: Pools) -> Base:
    word = rng.choice(pools.words)
    return Base("count_letters", f"How many letters are in the word {word}?", "",
                f"The word {word} has {len(word)} letters.", title="letter count")


def _arithmetic(rng: random.Random, pools: Pools) -> Base:
    a, b = rng.choice(pools.operands)
    op = rng.choice(("plus", "minus", "times"))
    if op == "minus" and a < b:
        a, b = b, a
    value = {"plus": a + b, "minus": a - b, "times": a * b}[op]
    return Base("arithmetic", f"What is {a} {op} {b}?", "", f"The answer is {value} because {a} {op} {b} "
                f"equals {value}.", title="the answer")


def _rewrite(rng: random.Random, pools: Pools) -> Base:
    subjects = [s for s in SUBJECTS if s in pools.words]
    noun, (present, past, plural_verb), obj = rng.choice(subjects), rng.choice(VERBS), rng.choice(OBJECTS)
    sentence = f"The {noun} {present} {obj}."
    if rng.random() < 0.5:
        return Base("rewrite", "Rewrite this sentence in the past tense.", sentence,
                    f"The {noun} {past} {obj}.", title="past tense")
    return Base("rewrite", "Rewrite this sentence with a plural subject.", sentence,
                f"The {SUBJECTS[noun]} {plural_verb} {obj}.", title="plural sentence")


def _list_items(rng: random.Random, pools: Pools) -> Base:
    category = rng.choice(sorted(CATEGORIES))
    n = rng.randint(2, 5)
    items = rng.sample([w for w in CATEGORIES[category] if w in pools.words], n)
    verb = rng.choice(("List", "Name"))
    return Base("list_items", f"{verb} {n} {category}.", "", f"Here are {n} {category}:", tuple(items), category)


def _lookup(rng: random.Random, pools: Pools) -> Base:
    table = rng.choice(("capital", "colour", "sound"))
    if table == "capital":
        country = rng.choice(pools.countries)
        return Base("lookup", f"What is the capital of {country}?", "",
                    f"The capital of {country} is {CAPITALS[country]}.", title="capital city")
    if table == "colour":
        fruit = rng.choice([f for f in FRUIT_COLOURS if f in pools.words and FRUIT_COLOURS[f] in pools.words])
        return Base("lookup", f"What colour is a ripe {fruit}?", "",
                    f"A ripe {fruit} is {FRUIT_COLOURS[fruit]}.", title="fruit colour")
    animal = rng.choice([a for a in ANIMAL_SOUNDS if a in pools.words])
    return Base("lookup", f"What sound does a {animal} make?", "",
                f"A {animal} says {ANIMAL_SOUNDS[animal]}.", title="animal sound")


TASKS: dict[str, Callable[[random.Random, Pools], Base]] = {
    "reverse_list": _reverse, "sort_list": _sort, "count_letters": _count_letters,
    "arithmetic": _arithmetic, "rewrite": _rewrite, "list_items": _list_items, "lookup": _lookup,
}


def _pools(heldout: bool) -> Pools:
    """Training side: nothing reserved. Held-out side: everything (a row is kept only if it needs it)."""
    keep = (lambda reserved: True) if heldout else (lambda reserved: not reserved)
    operands = [(a, b) for a in range(1, 13) for b in range(1, 13)]
    return Pools(words=tuple(w for w in VOCABULARY if keep(w in RESERVED_WORDS)),
                 countries=tuple(c for c in CAPITALS if keep(c in RESERVED_COUNTRIES)),
                 operands=tuple(p for p in operands if keep(_reserved_operands(*p))))


def _uses_reserved_item(base: Base) -> bool:
    """Whether the prompt can never occur in training: it names a reserved item, or (a table lookup)
    its one right answer does. A list_items answer is one pick among many, so it does not count."""
    text = " ".join((base.instruction, base.input, base.lead if base.task == "lookup" else ""))
    if any(w in RESERVED_WORDS for w in re.findall(r"[a-z]+", text.lower())):
        return True
    if any(c in RESERVED_COUNTRIES for c in re.findall(r"[A-Z][a-z]+", base.instruction)):
        return True
    match = re.fullmatch(r"What is (\d+) \w+ (\d+)\?", base.instruction)
    return bool(match) and _reserved_operands(int(match[1]), int(match[2]))


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
    pools = _pools(heldout=False)
    tasks = sorted(TASKS)
    examples: list[dict[str, Any]] = []
    while len(examples) < n:
        base = TASKS[rng.choice(tasks)](rng, pools)
        ids = _draw_constraints(rng, base, _constraint_count(rng))
        if (base.task, ids) in RESERVED_COMBOS:
            continue
        example = _make(rng, base, ids)
        if example is not None:
            examples.append(example)
    return examples


def build_records(n: int = DEFAULT_RECORDS, seed: int = 0) -> list[dict[str, str]]:
    """`n` training records {"instruction", "input", "output"}, the same for the same seed."""
    return [{k: e[k] for k in ("instruction", "input", "output")} for e in build_examples(n, seed)]


def _row(key: str, example: dict[str, Any], with_checks: bool, reference: bool) -> dict[str, Any]:
    row: dict[str, Any] = {"key": key, "prompt": prompt_text(example)}
    if with_checks:
        row["instruction_id_list"] = example["instruction_id_list"]
        row["kwargs"] = example["kwargs"]
    if reference:
        row["reference"] = example["output"]
    row["category"] = example["task"]
    return row


def build_heldout(n_ifeval: int = 150, n_general: int = 50, seed: int = HELDOUT_SEED
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows of eval_prompts/demo_ifeval.jsonl and demo_general.jsonl (design.md section 4).

    IFEval-style rows carry 1-2 constraints and are held out by a reserved item (half of them) or a
    reserved (task, constraint set) pair; general rows have no constraints, a reserved item and a
    reference. Tasks are taken in turn so that each is equally represented.
    """
    rng = random.Random(seed)
    pools = _pools(heldout=True)
    # list_items prompts name no item, so only a reserved combination can hold them out.
    item_tasks = sorted(t for t in TASKS if t != "list_items")
    combos = sorted(RESERVED_COMBOS, key=lambda c: (c[0], sorted(c[1])))
    seen: set[str] = set()
    ifeval: list[dict[str, Any]] = []
    general: list[dict[str, Any]] = []
    for _attempt in range(100 * (n_ifeval + n_general)):
        if len(ifeval) < n_ifeval and len(ifeval) % 2 == 0:
            task, ids = rng.choice(combos)
            base = TASKS[task](rng, pools)
        elif len(ifeval) < n_ifeval:
            base = TASKS[item_tasks[len(ifeval) // 2 % len(item_tasks)]](rng, pools)
            ids = _draw_constraints(rng, base, rng.choice((1, 2)))
        elif len(general) < n_general:
            base = TASKS[item_tasks[len(general) % len(item_tasks)]](rng, pools)
            ids = frozenset()
        else:
            break
        if (base.task, ids) not in RESERVED_COMBOS and not _uses_reserved_item(base):
            continue
        example = _make(rng, base, ids)
        if example is None or _normalise(prompt_text(example)) in seen:
            continue
        seen.add(_normalise(prompt_text(example)))
        if ids:
            # list_items answers are one pick among many: a reference would measure luck, not quality.
            ifeval.append(_row(f"demo-ifeval-{len(ifeval) + 1:03d}", example, True, base.task != "list_items"))
        else:
            general.append(_row(f"demo-general-{len(general) + 1:03d}", example, False, True))
    else:
        raise RuntimeError("build_heldout: the reserved items are too few for the rows asked for")
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
