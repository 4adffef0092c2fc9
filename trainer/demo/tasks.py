"""The demo's base tasks and the vocabulary they draw from: reverse a list of words, sort a list of
numbers, count letters, arithmetic, rewrite a sentence, list items, look up a fact. Every word, fact
and operand pair is trained on; what is held out is whole prompts (see `is_reserved_prompt`), so a
held-out prompt asks for something the model can know, in words it has never seen together."""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass

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


RESERVED_SHARE = 8
"""One prompt in this many is held out: never trained on, for any seed."""


def is_reserved_prompt(text: str) -> bool:
    """Whether a prompt (its user message) belongs to the held-out side: a stable hash of its
    lower-cased, whitespace-collapsed text, so the split needs no list and holds for every seed."""
    return zlib.crc32(" ".join(text.lower().split()).encode()) % RESERVED_SHARE == 0


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
    """What a generator draws from."""

    words: tuple[str, ...]
    countries: tuple[str, ...]
    operands: tuple[tuple[int, int], ...]


POOLS = Pools(words=VOCABULARY, countries=tuple(CAPITALS),
              operands=tuple((a, b) for a in range(1, 10) for b in range(1, 10)))


def _listed(items: list[str]) -> str:
    """A list task's input: the words after "List:", so every item follows a space, as in the answer
    (its token is the one the answer repeats; after the line break it would be another). The list comes
    last, after the constraint sentences, right before the answer, so the next item to copy is always
    about the same distance back. With the list inside the instruction, before 0-2 constraint
    sentences, the demo model repeated items ("mouse, saw, saw"): at step 2,400, 4 of 22 held-out
    reversals were right, and 16 of 21 this way (2026-12-02, the 150 held-out prompts of each layout)."""
    return f"List: {', '.join(items)}."


def _reverse(rng: random.Random, pools: Pools) -> Base:
    items = rng.sample(pools.words, rng.randint(3, 5))
    ask = rng.choice(("Reverse the order of this list.", "Write this list backwards."))
    return Base("reverse_list", ask, _listed(items), "The reversed list is:", tuple(reversed(items)), "reversed list")


# Sorting numbers (the kind of request people make: "Sort these numbers: 5, 2, 9"), 1-20. Sorting
# words alphabetically needed letter-level knowledge the BPE model's whole-word tokens do not carry:
# 3 of 17 held-out sorts were right at step 2,400; numbers, 12 of 14 (2026-12-03, 150 prompts each).
SORT_NUMBERS = tuple(range(1, 21))


def _sort(rng: random.Random, pools: Pools) -> Base:
    numbers = rng.sample(SORT_NUMBERS, rng.randint(3, 5))
    ask = rng.choice(("Sort these numbers from smallest to largest.", "Put these numbers in ascending order."))
    return Base("sort_list", ask, _listed([str(n) for n in numbers]), "The sorted list is:",
                tuple(str(n) for n in sorted(numbers)), "sorted list")


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
# How often each task is drawn for training: the ones a small model learns last (copying a list in
# another order, the 243 arithmetic facts) twice as often as the others. (Four times as often for
# sorting, when it sorted words, gave 72.6% task accuracy at step 2,400 on the 150 held-out prompts,
# against 78.8%: sorting 6 of 17 instead of 3, reversing 11 of 21 instead of 16.)
TASK_WEIGHTS = {"reverse_list": 2, "sort_list": 2, "arithmetic": 2, "count_letters": 1, "rewrite": 1,
                "list_items": 1, "lookup": 1}


def answer_text(base: Base) -> str | None:
    """The content a right answer states, whatever the constraints do to its form: the answer
    sentence, or the lead and the items in order. None for list_items, whose answer is one pick
    among many."""
    if base.task == "list_items":
        return None
    return f"{base.lead} {', '.join(base.items)}." if base.items else base.lead
