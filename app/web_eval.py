"""Eval tab: held-out scoring on chosen checkpoints, with a progress bar, a summary table and the
per-prompt answers side by side. Generation and scores are trainer.evals.heldout's, the path of
`trainer eval` and of the training run's reports, so a number here is the number they give."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import pandas as pd

from app.catalog import round_value
from app.web_common import (
    WebConfig,
    client_error,
    prompt_file_choices,
    public,
    rel,
    resolve_checkpoint,
    resolve_prompt_file,
    user_error,
)
from trainer.core.errors import StepwiseError
from trainer.evals.heldout import heldout_samples
from trainer.evals.prompts import load_prompts
from trainer.evals.scoring import SUMMARY_METRICS
from trainer.inference.generate import GenerationSettings

SUMMARY_KEYS = (*SUMMARY_METRICS, "mean_length")
SUMMARY_HEADERS = ["checkpoint", "n", *SUMMARY_KEYS, "finished"]
MAX_EVAL_PROMPTS = 200
CHUNK = 8  # prompts per batch, so the progress bar moves within a checkpoint


def _mark(row: dict) -> str:
    checks = " ".join(("✓" if s else "✗") for s in row.get("strict") or [])
    rouge = f" rougeL {row['rougeL']:.2f}" if row.get("rougeL") is not None else ""
    answer = "" if row.get("correct") is None else f" answer {'✓' if row['correct'] else '✗'}"
    return f"{row.get('response', '')}\n[{checks or '-'}{rouge}{answer}]"


def run_eval(cfg: WebConfig, cache, picks, prompt_file, n_prompts, max_new_tokens, progress):
    if not picks:
        raise user_error("Choose at least one checkpoint.")
    try:
        paths = [resolve_checkpoint(cfg.root, p) for p in picks]
        prompts = load_prompts(resolve_prompt_file(cfg, prompt_file))
    except StepwiseError as err:
        raise client_error(cfg.root, err) from None
    prompts = prompts[: max(1, min(int(n_prompts or 1), MAX_EVAL_PROMPTS))]
    settings = GenerationSettings(max_new_tokens=max(1, min(int(max_new_tokens or 1), cfg.max_new_tokens)))
    total = len(paths) * len(prompts)
    summary, answers = [], {p.key: [p.key, p.prompt] for p in prompts}
    done = 0
    for path in paths:
        name = rel(cfg.root, path)
        progress((done, total), desc=f"loading {name}")
        try:
            loaded = cache.get(path)
        except StepwiseError as err:
            shown = public(cfg.root, err)
            summary.append([name, 0, *([None] * len(SUMMARY_KEYS)), f"error: {shown}"])
            for row in answers.values():
                row.append(f"error: {shown}")
            done += len(prompts)
            continue
        base = done

        def on_batch(n: int) -> None:  # called in this iteration only, after each batch
            if n < len(prompts):
                progress((base + n, total), desc=f"{name}: prompt {n + 1} of {len(prompts)}")

        progress((done, total), desc=f"{name}: prompt 1 of {len(prompts)}")
        rows, s = heldout_samples(loaded.model, loaded.tokenizer, prompts, settings, batch_size=CHUNK,
                                  on_batch=on_batch)
        done += len(prompts)
        finished = sum(bool(r.get("finished")) for r in rows)
        summary.append([name, s.get("n"), *(round_value(s.get(k)) for k in SUMMARY_KEYS), f"{finished}/{len(rows)}"])
        for p, row in zip(prompts, rows):
            answers[p.key].append(_mark(row))
    progress((total, total), desc="done")
    headers = ["key", "prompt", *(rel(cfg.root, p) for p in paths)]
    return pd.DataFrame(summary, columns=SUMMARY_HEADERS), pd.DataFrame(list(answers.values()), columns=headers)


@dataclass
class EvalTab:
    picks: gr.Dropdown


def build_eval_tab(cfg: WebConfig, cache) -> EvalTab:
    gr.Markdown("Generate on held-out prompts with the chosen checkpoints (greedy) and score the answers.")
    picks = gr.Dropdown(label="Checkpoints", choices=[], multiselect=True, allow_custom_value=True,
                        elem_id="eval-checkpoints")
    with gr.Row():
        files = prompt_file_choices(cfg)
        prompt_file = gr.Dropdown(label="Held-out prompts", choices=files, value=files[0] if files else None,
                                  elem_id="eval-prompts")
        n_prompts = gr.Slider(1, MAX_EVAL_PROMPTS, value=16, step=1, label="Prompts (the first N)")
        max_new = gr.Slider(1, cfg.max_new_tokens, value=min(96, cfg.max_new_tokens), step=1,
                            label="Max new tokens")
    go = gr.Button("Run held-out eval", variant="primary", elem_id="eval-run")
    summary = gr.Dataframe(headers=SUMMARY_HEADERS, label="Scores", interactive=False, elem_id="eval-summary")
    answers = gr.Dataframe(label="Answers side by side (✓/✗: each instruction, strict)", interactive=False,
                           wrap=True, elem_id="eval-answers")

    def evaluate(picks, prompt_file, n_prompts, max_new, progress=gr.Progress()):
        return run_eval(cfg, cache, picks, prompt_file, n_prompts, max_new, progress)

    go.click(evaluate, [picks, prompt_file, n_prompts, max_new], [summary, answers], api_name="eval",
             concurrency_id="generate", concurrency_limit=cfg.concurrency)
    return EvalTab(picks)


