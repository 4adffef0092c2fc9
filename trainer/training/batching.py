"""Chat-template tokenization with prompt masking, and length-grouped batches.

Labels are -100 on every prompt token (system, user, the template's own scaffolding) and on padding,
so the loss covers the assistant's words and the end-of-turn token only. Batches are grouped by
length so there is little padding, and each row is one example: no example attends to another.
With --packing (`collate_packed`) a micro-batch's examples share rows instead, each still attending
only to itself.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from trainer.core.chat import answer_end, render
from trainer.core.errors import StepwiseError

IGNORE = -100

def segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, supervised) pieces: each assistant turn is
    supervised from its first word to its end-of-turn token (chat.answer_end); everything else is prompt."""
    pieces, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1])
        if not prefix.startswith(done) or not upto.startswith(prefix):
            raise StepwiseError("the tokenizer's chat template does not render turns as prefixes of each other")
        end = len(prefix) + answer_end(tokenizer, upto[len(prefix):])
        pieces += [(prefix[len(done):], False), (upto[len(prefix):end], True), (upto[end:], False)]
        done = upto
    return [(text, sup) for text, sup in pieces if text]


@dataclass
class TokenStats:
    """What tokenization did to the data, for the log and the planner."""

    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    supervised: int = 0


def tokenize(tokenizer, records: list[dict], context_length: int) -> tuple[list[dict], TokenStats]:
    """{input_ids, labels} per record, truncated at context_length; an example whose answer starts
    beyond the context has nothing to learn from and is dropped."""
    stats, out = TokenStats(), []
    for record in records:
        ids, labels = [], []
        for text, supervised in segments(tokenizer, record["messages"]):
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if supervised else [IGNORE] * len(piece)
        if len(ids) > context_length:
            stats.truncated += 1
            ids, labels = ids[:context_length], labels[:context_length]
        # The first label predicts from nothing after the shift; only labels[1:] are learned from.
        n_sup = sum(1 for x in labels[1:] if x != IGNORE)
        if n_sup == 0:
            stats.dropped += 1
            continue
        stats.examples += 1
        stats.tokens += len(ids)
        stats.supervised += n_sup
        out.append({"input_ids": ids, "labels": labels})
    return out, stats


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding gets label -100 and attention mask 0."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` in rows of at most `capacity` tokens (any longer item alone in its row):
    as few rows as first-fit decreasing finds, their longest as short as it can be for that many."""
    if not lengths:
        return []
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)

    def first_fit(cap: int) -> list[list[int]]:
        rows, room = [], []
        for i in order:
            fit = next((r for r, left in enumerate(room) if lengths[i] <= left), None)
            if fit is None:
                rows.append([i])
                room.append(cap - lengths[i])
            else:
                rows[fit].append(i)
                room[fit] -= lengths[i]
        return rows

    rows = first_fit(max(capacity, lengths[order[0]]))
    width = max(lengths[order[0]], -(-sum(lengths) // len(rows)))
    while len(balanced := first_fit(width)) > len(rows):  # the narrowest width that keeps the count
        width += 1
    return balanced


def collate_packed(examples: list[dict], pad_id: int, capacity: int) -> dict[str, torch.Tensor]:
    """The examples packed into rows of at most `capacity` tokens (pack_rows), right-padded to the
    longest row. position_ids restart at 0 for each example (and for a row's padding), and there is
    no attention_mask: transformers then masks attention block-diagonally, so a token sees only its
    own example's earlier tokens, at the positions it has alone. Each example's first label is -100:
    the row's previous token belongs to another example and must not predict it."""
    rows = pack_rows([len(e["input_ids"]) for e in examples], capacity)
    width = max(sum(len(examples[i]["input_ids"]) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            e, n = examples[i], len(examples[i]["input_ids"])
            ids[r, at:at + n] = torch.tensor(e["input_ids"])
            labels[r, at + 1:at + n] = torch.tensor(e["labels"][1:])
            positions[r, at:at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def micro_batches(lengths: list[int], mini_batch_size: int, seed: int, epoch: int,
                  group: int = 64) -> list[list[int]]:
    """One epoch's micro-batches of example indices, length-grouped.

    Shuffle (seeded by epoch), sort each window of `group` micro-batches by length so neighbours
    have similar lengths, cut into micro-batches, then shuffle the micro-batches so a step's lengths
    are not sorted. The same (seed, epoch) always gives the same list: resume and DDP rely on it.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = mini_batch_size * group
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i:i + mini_batch_size] for i in range(0, len(chunk), mini_batch_size)]
    rng.shuffle(batches)
    return batches


def steps_per_epoch(n_examples: int, mini_batch_size: int, micro_per_step: int) -> int:
    """Optimizer steps in one epoch (the leftover micro-batches of an epoch are not used)."""
    return math.ceil(n_examples / mini_batch_size) // micro_per_step


def padding_efficiency(lengths: list[int], batches: list[list[int]], packed_to: int | None = None) -> float:
    """Share of non-padding tokens over the batches (packed into rows of `packed_to` tokens if given)."""
    real = sum(lengths[i] for b in batches for i in b)
    padded = 0
    for b in batches:
        if packed_to:
            rows = pack_rows([lengths[i] for i in b], packed_to)
            padded += len(rows) * max(sum(lengths[b[i]] for i in row) for row in rows)
        else:
            padded += max(lengths[i] for i in b) * len(b)
    return real / padded if padded else 1.0
