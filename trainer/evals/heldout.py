"""The one held-out path: generate on held-out prompts, score every answer, summarise the scores.

The trainer's checkpoint samples, `trainer eval`, the web app's Eval tab and the REPL's --spot-check
call heldout_samples(); front ends that stream answers themselves (the REPL's /heldout, the web app's
random held-out prompt) score each finished answer with score_generation() and summarise with
summarize_rows(). So a score means the same thing wherever it is shown.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from trainer.evals.prompts import HeldoutPrompt
from trainer.evals.scoring import score_response, summarize
from trainer.inference.generate import Generation, GenerationSettings, generate_batch


def score_generation(prompt: HeldoutPrompt, generation: Generation) -> dict:
    """One per-prompt row: score_response's dict plus the answer's `finished` and `new_tokens`."""
    row = score_response(prompt, generation.text)
    row.update(finished=generation.finished, new_tokens=generation.new_tokens)
    return row


def summarize_rows(rows: Sequence[dict]) -> dict:
    """summarize() of score_generation rows, the EOS rate from their `finished`."""
    return summarize(rows, finished=[r["finished"] for r in rows])


def heldout_samples(model, tokenizer, prompts: list, settings: GenerationSettings, batch_size: int = 16,
                    on_batch: Callable[[int], None] | None = None) -> tuple[list[dict], dict]:
    """Generate on held-out prompts (batched, as generate_batch; on_batch(n_done) after each batch)
    and score each answer. Returns the score_generation rows, in prompt order, and summarize_rows()."""
    conversations = [[{"role": "user", "content": p.prompt}] for p in prompts]
    generations = generate_batch(model, tokenizer, conversations, settings, batch_size=batch_size, on_batch=on_batch)
    rows = [score_generation(p, g) for p, g in zip(prompts, generations)]
    return rows, summarize_rows(rows)
