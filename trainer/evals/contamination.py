"""Held-out prompts that also appear in the training data: exact copies and near-duplicates.

Exact: equal after lower-casing and collapsing whitespace. Near: the share of a held-out prompt's
word n-grams (lower-cased \\w+ words, n=13 as in GPT-3 by default) that occur anywhere in the training prompts
reaches the threshold (0.8, Llama 2's "contaminated" cut-off), the overlap measure of those studies.
Templated data (the demo) shares its wording across prompts, so some of its held-out prompts count as
near-duplicates although no held-out prompt occurs in training: the warning says how many are exact.
The training n-grams are hashed into one dict once, so a check is a single pass over each side.
A prompt shorter than n words has no n-grams and is checked for exact copies only.
"""

from __future__ import annotations

import re
from collections import Counter

_WORD = re.compile(r"\w+")
POSTINGS = 32


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def _grams(text: str, n: int) -> list[int]:
    words = _WORD.findall(text.lower())
    return [hash(" ".join(words[i:i + n])) for i in range(len(words) - n + 1)]


def find_contamination(heldout_prompts: list[str], train_prompts: list[str], n: int = 13, threshold: float = 0.8,
                       keys: list[str] | None = None) -> dict:
    """{"count", "indices", "keys", "exact": [i...], "near": [{"index", "key", "overlap", "train_index"}...],
    "n", "threshold", "train_prompts"}: indices into heldout_prompts, keys from `keys` (default the
    indices as strings); a near entry names the training prompt sharing the most n-grams with it."""
    keys = [str(k) for k in keys] if keys is not None else [str(i) for i in range(len(heldout_prompts))]
    exact_index: dict[str, int] = {}
    # n-gram -> the first POSTINGS training prompts holding it. Capped: a boilerplate phrase shared by
    # thousands of templated prompts adds nothing to finding the one a held-out prompt was copied from.
    postings: dict[int, list[int]] = {}
    for j, text in enumerate(train_prompts):
        exact_index.setdefault(normalise(text), j)
        for g in set(_grams(text, n)):
            holders = postings.setdefault(g, [])
            if len(holders) < POSTINGS:
                holders.append(j)
    exact, near = [], []
    for i, text in enumerate(heldout_prompts):
        if normalise(text) in exact_index:
            exact.append(i)
            continue
        grams = _grams(text, n)
        shared = [postings[g] for g in grams if g in postings]
        overlap = len(shared) / len(grams) if grams else 0.0
        if shared and overlap >= threshold:
            votes: Counter = Counter()
            for holders in shared:  # a rare n-gram says more about the source than a common one
                for j in holders:
                    votes[j] += 1.0 / len(holders)
            source = votes.most_common(1)[0][0]
            near.append({"index": i, "key": keys[i], "overlap": round(overlap, 4), "train_index": source})
    indices = sorted(exact + [x["index"] for x in near])
    return {"count": len(indices), "indices": indices, "keys": [keys[i] for i in indices], "exact": exact,
            "near": near, "n": n, "threshold": threshold, "heldout_prompts": len(heldout_prompts),
            "train_prompts": len(train_prompts)}


def record_prompts(records: list[dict]) -> list[str]:
    """Every user turn of trainer.training.data-style records ({"messages": [...]}), as training prompts."""
    return [m["content"] for r in records for m in r["messages"] if m["role"] == "user"]


def check_prompts_against_records(prompts: list[str], records: list[dict], keys: list[str] | None = None,
                                  n: int = 13, threshold: float = 0.8) -> dict:
    """find_contamination against the user turns of training records."""
    return find_contamination(prompts, record_prompts(records), n=n, threshold=threshold, keys=keys)


def warn(found: dict, console=None, source: str = "the training data", templated: bool = False) -> None:
    """Print the count and the first keys (nothing when clean). templated: the training data is made
    from the same templates as the prompts (the demo), so shared wording is expected: near-duplicates
    alone then get one plain note, and only exact copies are a warning."""
    if not found.get("count"):
        return
    from rich.console import Console

    console = console or Console(stderr=True)
    if templated and not found["exact"]:
        console.print(f"[dim]note: {len(found['near'])} of {found['heldout_prompts']} held-out prompts share template "
                      f"wording with {source} ({found['n']}-gram overlap >= {found['threshold']:.0%}); none is an exact "
                      "copy: each is a whole prompt the demo never trains on[/]")
        return
    first = ", ".join(found["keys"][:5]) + (" ..." if found["count"] > 5 else "")
    console.print(f"[yellow]warning:[/] {found['count']} of {found['heldout_prompts']} held-out prompt(s) also "
                  f"appear in {source} ({len(found['exact'])} exact, {len(found['near'])} near-duplicate by "
                  f"{found['n']}-gram overlap >= {found['threshold']:.0%}): {first}")
