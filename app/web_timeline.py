"""Timeline tab: one held-out prompt's answer at every checkpoint of a run, in step order, with its
scores, read from the samples.jsonl the trainer stored with each checkpoint (no model is loaded)."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from app.web_common import WebConfig, esc, refresh_runs, resolve_run, scores_html
from trainer.core.catalog import read_run
from trainer.core.errors import StepwiseError

SAMPLES_FILE = "samples.jsonl"


def read_samples(folder: Path) -> list[dict]:
    path = folder / SAMPLES_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _key(row: dict, i: int) -> str:
    return str(row.get("key") or f"#{i + 1}")


def prompt_choices(run_dir: Path) -> list[tuple[str, str]]:
    """(label, key) of every held-out prompt any step of the run has a sample for, in file order."""
    seen: dict[str, str] = {}
    for c in read_run(run_dir).checkpoints:
        if c.is_final:
            continue
        for i, row in enumerate(read_samples(c.path)):
            key = _key(row, i)
            if key not in seen:
                prompt = " ".join(str(row.get("prompt", "")).split())
                seen[key] = f"{key}: {prompt[:70]}{'...' if len(prompt) > 70 else ''}"
    return [(label, key) for key, label in seen.items()]


def timeline_html(run_dir: Path, key: str) -> str:
    steps = [c for c in read_run(run_dir).checkpoints if not c.is_final]
    cards, prompt = [], None
    for c in steps:
        rows = read_samples(c.path)
        row = next((r for i, r in enumerate(rows) if _key(r, i) == key), None)
        head = esc(c.label)  # the catalogue's label, as in the pickers: run · step 500 · val 1.234 · best
        if row is None:
            cards.append(f"<div class='sw-step'><b>{head}</b><div><i>no sample for this prompt</i></div></div>")
            continue
        prompt = prompt or row.get("prompt")
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
