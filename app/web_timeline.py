"""Timeline tab: one held-out prompt's answer at every checkpoint of a run, in step order, with its
scores and the prompt's reference answer, read from the samples.jsonl the trainer stored with each
checkpoint (no model is loaded). Samples written before rows carried `reference` show without it."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from app.web_common import (
    WebConfig,
    esc,
    readable_file,
    refresh_runs,
    resolve_run,
    run_info,
    scores_html,
)
from trainer.core.errors import StepwiseError
from trainer.core.files import read_jsonl_lenient

SAMPLES_FILE = "samples.jsonl"


def read_samples(folder: Path) -> list[dict]:
    """A checkpoint's stored samples; a torn or bad line is skipped, and a samples.jsonl that links
    outside the run's root is not read."""
    path = folder / SAMPLES_FILE
    if not readable_file(folder.parent.parent.resolve(), path):
        return []
    return read_jsonl_lenient(path)[0]


def _key(row: dict, i: int) -> str:
    return str(row.get("key") or f"#{i + 1}")


def prompt_choices(run_dir: Path) -> list[tuple[str, str]]:
    """(label, key) of every held-out prompt any step of the run has a sample for, in file order."""
    seen: dict[str, str] = {}
    for c in run_info(run_dir).checkpoints:
        if c.is_final:
            continue
        for i, row in enumerate(read_samples(c.path)):
            key = _key(row, i)
            if key not in seen:
                prompt = " ".join(str(row.get("prompt", "")).split())
                seen[key] = f"{key}: {prompt[:70]}{'...' if len(prompt) > 70 else ''}"
    return [(label, key) for key, label in seen.items()]


def timeline_html(run_dir: Path, key: str) -> str:
    steps = [c for c in run_info(run_dir).checkpoints if not c.is_final]
    cards, prompt, reference = [], None, None
    for c in steps:
        rows = read_samples(c.path)
        row = next((r for i, r in enumerate(rows) if _key(r, i) == key), None)
        head = esc(c.label)  # the catalogue's label, as in the pickers: run · step 500 · val 1.234 · best
        if row is None:
            cards.append(f"<div class='sw-step'><b>{head}</b><div><i>no sample for this prompt</i></div></div>")
            continue
        prompt = prompt or row.get("prompt")
        reference = reference or row.get("reference")
        stats = []
        if row.get("new_tokens") is not None:
            stats.append(f"{row['new_tokens']} tokens")
        if row.get("finished") is not None:
            stats.append("finished" if row["finished"] else "cut at max_new_tokens")
        cls = "sw-step sw-best" if c.is_best else "sw-step"
        cards.append(f"<div class='{cls}' data-step='{c.step}'><b>{head}</b>"
                     f"<div class='sw-answer'>{esc(row.get('response', ''))}</div>"
                     f"{scores_html(row)}<small>{esc(' · '.join(stats))}</small></div>")
    if not steps:
        return "<i>This run has no step checkpoints yet.</i>"
    top = f"<p><b>Prompt {esc(key)}</b></p><div class='sw-ref'>{esc(prompt or '')}</div>" if prompt else ""
    if reference:
        top += f"<p><b>Reference answer</b></p><div class='sw-ref sw-reference'>{esc(reference)}</div>"
    return f"<div class='sw-timeline'>{top}{''.join(cards)}</div>"


@dataclass
class TimelineTab:
    run: gr.Dropdown
    prompt: gr.Dropdown
    view: gr.HTML


def build_timeline_tab(cfg: WebConfig) -> TimelineTab:
    gr.Markdown("One held-out prompt's answer at every checkpoint of a run, from the samples stored "
                "while training (nothing is generated here).")
    with gr.Row():
        run = gr.Dropdown(label="Run", choices=[], elem_id="timeline-run", allow_custom_value=True)
        prompt = gr.Dropdown(label="Held-out prompt", choices=[], elem_id="timeline-prompt",
                             allow_custom_value=True, scale=3)
        refresh = gr.Button("Refresh", scale=0)
    view = gr.HTML(elem_id="timeline-view")

    def pick_run(name):
        try:
            choices = prompt_choices(resolve_run(cfg.root, name))
        except StepwiseError as err:
            return gr.Dropdown(choices=[], value=None), f"<i>{esc(err)}</i>"
        first = choices[0][1] if choices else None
        return gr.Dropdown(choices=choices, value=first), show(name, first)

    def show(name, key):
        if not key:
            return "<i>No held-out samples in this run (train with --eval_prompts FILE).</i>"
        try:
            return timeline_html(resolve_run(cfg.root, name), str(key))
        except StepwiseError as err:
            return f"<i>{esc(err)}</i>"

    run.change(pick_run, run, [prompt, view], api_name="timeline_run")
    prompt.input(show, [run, prompt], view, api_name="timeline")
    refresh.click(functools.partial(refresh_runs, cfg.root), run, run, api_visibility="undocumented").then(
        show, [run, prompt], view)
    return TimelineTab(run, prompt, view)
