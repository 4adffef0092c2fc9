"""Training tab: a run's loss curves with checkpoint and best markers, IF metrics per checkpoint,
early-stopping state, the overfitting verdict, and the planner's table for the run's config."""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from rich.console import Console

from app.catalog import round_value
from app.web_common import (
    WebConfig,
    esc,
    fmt,
    public,
    readable_file,
    refresh_runs,
    resolve_run,
    run_info,
)
from trainer.core.errors import StepwiseError, first_line
from trainer.evals.scoring import SUMMARY_METRICS
from trainer.training.metrics import classify_trend

METRIC_COLUMNS = (*SUMMARY_METRICS, "mean_length")
CHECKPOINT_HEADERS = ["checkpoint", "step", "epoch", "val_loss", *METRIC_COLUMNS]


PLOTTED = ("if_prompt_strict", "if_inst_strict", "if_prompt_loose", "rougeL", "task_accuracy")


def loss_figure(history: list[dict], checkpoint_steps: list[int], best_step: int | None,
                checkpoint_metrics: dict[int, dict] | None = None):
    """Train and val loss against step, dotted lines at checkpoints and a star on the best; below it,
    the held-out metrics of each checkpoint when the run scored any."""
    from matplotlib.figure import (
        Figure,  # no pyplot: no global figure state in a server
    )

    metrics = {s: m for s, m in sorted((checkpoint_metrics or {}).items()) if any(m.get(k) is not None for k in PLOTTED)}
    fig = Figure(figsize=(9, 6.4 if metrics else 4.2), dpi=100, layout="constrained")
    axes = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1]) if metrics else [fig.add_subplot()]
    ax = axes[0]
    train = [(h["step"], h["train_loss"]) for h in history if h.get("train_loss") is not None]
    val = [(h["step"], h["val_loss"]) for h in history if h.get("val_loss") is not None]
    if train:
        ax.plot(*zip(*train), label="train loss", color="#2563eb", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", color="#ea580c", linewidth=1.5, markersize=4)
    for a in axes:
        for i, step in enumerate(checkpoint_steps):
            a.axvline(step, color="#6b7280", linestyle=":", linewidth=1, label="checkpoint" if i == 0 else None)
    best_val = dict(val).get(best_step) if best_step is not None else None
    if best_val is not None:
        ax.plot([best_step], [best_val], "*", color="#16a34a", markersize=16, label=f"best (step {best_step})",
                zorder=5)
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend(loc="upper right")
    else:
        ax.text(0.5, 0.5, "no losses logged yet", ha="center", va="center", transform=ax.transAxes)
    if metrics:
        low = axes[1]
        for key in PLOTTED:
            points = [(s, m[key]) for s, m in metrics.items() if m.get(key) is not None]
            if points:
                low.plot(*zip(*points), "s-", label=key, markersize=4, linewidth=1.2)
        low.set_ylim(-0.02, 1.02)
        low.set_ylabel("held-out")
        low.grid(alpha=0.3)
        low.legend(loc="upper left", fontsize="small", ncols=2)
    axes[-1].set_xlabel("step")
    return fig


def checkpoint_rows(run) -> list[list]:
    by_step = {h["step"]: h for h in run.metrics.get("history", [])}
    rows = []
    for c in run.checkpoints:
        h = by_step.get(c.step, {})
        m = {**{k: h.get(k) for k in METRIC_COLUMNS}, **(c.metrics or {})}
        rows.append([c.label, c.step, round_value(h.get("epoch")), round_value(c.val_loss),
                     *(round_value(m.get(k)) for k in METRIC_COLUMNS)])
    return rows


def status_markdown(metrics: dict) -> str:
    """Stop reason, early-stopping state, the trend (overfitting verdict) and the recommendation."""
    history = metrics.get("history", [])
    trend = metrics.get("trend") or (classify_trend(history) if history else None)
    es = metrics.get("early_stopping") or {}
    best = metrics.get("best") or {}
    lines = [f"**Verdict:** {trend or 'no evaluations yet'}"]
    if metrics.get("recommendation"):
        lines.append(f"**Recommendation:** {metrics['recommendation']}")
    if metrics.get("stop_reason"):
        lines.append(f"**Stopped:** {metrics['stop_reason']}")
    elif history:
        lines.append(f"**Running or interrupted:** last logged step {history[-1].get('step')}")
    if best:
        lines.append(f"**Best:** step {best.get('step')} ({best.get('metric', 'val_loss')} "
                     f"{fmt(best.get('value', best.get('val_loss')), 4)}), epoch {fmt(best.get('epoch'), 2)}")
    if es:
        patience = es.get("patience")
        lines.append(f"**Early stopping:** on {es.get('metric', 'val_loss')}, "
                     + (f"patience {patience}, threshold {es.get('threshold')}, " if patience else "off, ")
                     + f"{es.get('bad_evals', 0)} evaluation(s) without improvement"
                     + (", stopped" if es.get("stopped") else ""))
    return "\n\n".join(lines)


def plan_text(run_dir: Path, metrics: dict) -> str:
    """The planner's table for the run's saved config, fed the example counts and step time the run
    recorded (no data loading or timing in a web request); without those, the config and counts as they are."""
    from trainer.core.config import load_saved
    from trainer.training import plan as planner

    config_path = run_dir / "config.yaml"
    data = metrics.get("data") or {}
    try:
        if not readable_file(run_dir.parent.resolve(), config_path):
            raise StepwiseError(f"{config_path.name}: not found under the root")
        cfg = load_saved(config_path)
        if data.get("train_examples") is not None:
            plan = planner.count(cfg, int(data["train_examples"]), int(data.get("val_examples") or 0))
            plan.tokens_per_epoch = data.get("train_tokens")
            if plan.tokens_per_epoch is not None:
                plan.truncated_share = (data.get("truncated") or 0) / max(int(data["train_examples"]), 1)
            if data.get("seconds_per_step"):
                plan.seconds_per_step, plan.timing_source = float(data["seconds_per_step"]), "recorded by this run"
            else:
                plan.timing_source = "no step time recorded"
            console = Console(file=io.StringIO(), width=100, record=True, color_system=None, highlight=False)
            planner.render(plan, console)
            return console.export_text()
    except Exception as err:  # a planner failure must not take the tab down; fall through to the raw facts
        data = {**data, "planner_error": public(run_dir.parent.resolve(), f"{type(err).__name__}: {first_line(err)}")}
    counts = "\n".join(f"{k}: {v}" for k, v in data.items())
    # Shown raw, so only a config.yaml that stays under the root (not a symlink to elsewhere).
    shown = readable_file(run_dir.parent.resolve(), config_path)
    config = config_path.read_text(errors="replace") if shown else "(no config.yaml)"
    return f"# counts from training_metrics.json (planner table not available)\n{counts}\n\n# config.yaml\n{config}"


@dataclass
class TrainingTab:
    run: gr.Dropdown


def build_training_tab(cfg: WebConfig) -> TrainingTab:
    with gr.Row():
        run = gr.Dropdown(label="Run", choices=[], elem_id="training-run", allow_custom_value=True)
        refresh = gr.Button("Refresh", scale=0)
    plot = gr.Plot(label="Loss", elem_id="training-plot")
    status = gr.Markdown(elem_id="training-status")
    table = gr.Dataframe(headers=CHECKPOINT_HEADERS, label="Checkpoints: val loss and held-out metrics",
                         interactive=False, elem_id="training-checkpoints")
    with gr.Accordion("Plan for this run's config", open=False):
        plan = gr.Code(label="plan", language=None, interactive=False, elem_id="training-plan")

    def show(name):
        try:
            run_dir = resolve_run(cfg.root, name)
        except StepwiseError as err:
            return None, f"*{esc(err)}*", [], ""
        info = run_info(run_dir, cfg.root)
        steps = [c.step for c in info.checkpoints if not c.is_final and c.step is not None]
        best = (info.metrics.get("best") or {}).get("step")
        by_step = {h["step"]: h for h in info.metrics.get("history", [])}
        scored = {c.step: {**by_step.get(c.step, {}), **(c.metrics or {})} for c in info.checkpoints
                  if not c.is_final and c.step is not None}
        fig = loss_figure(info.metrics.get("history", []), steps, best, scored)
        return fig, status_markdown(info.metrics), checkpoint_rows(info), plan_text(run_dir, info.metrics)

    run.change(show, run, [plot, status, table, plan], api_name="training")
    refresh.click(functools.partial(refresh_runs, cfg.root), run, run, api_visibility="undocumented").then(
        show, run, [plot, status, table, plan])
    return TrainingTab(run)
