"""The one held-out path: generate on held-out prompts and score every answer.

The trainer's checkpoint samples, `trainer eval`, the web app's Eval tab, the REPL's /heldout and
--spot-check all call heldout_samples(), so a score means the same thing wherever it is shown.
"""

from __future__ import annotations

from collections.abc import Callable

from trainer.evals.scoring import score_response, summarize
from trainer.inference.generate import GenerationSettings, generate_batch


def heldout_samples(model, tokenizer, prompts: list, settings: GenerationSettings, batch_size: int = 16,
                    on_batch: Callable[[int], None] | None = None) -> tuple[list[dict], dict]:
    """Generate on held-out prompts (batched, as generate_batch) and score each answer. Returns the
    per-prompt rows (score_response's dict plus `finished` and `new_tokens`) and summarize()'s dict."""
    conversations = [[{"role": "user", "content": p.prompt}] for p in prompts]
    generations = generate_batch(model, tokenizer, conversations, settings, batch_size=batch_size, on_batch=on_batch)
    rows = []
    for p, g in zip(prompts, generations):
        row = score_response(p, g.text)
        row.update(finished=g.finished, new_tokens=g.new_tokens)
        rows.append(row)
    return rows, summarize(rows, finished=[g.finished for g in generations])
