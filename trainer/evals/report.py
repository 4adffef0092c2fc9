"""Reports of held-out results: the table `trainer eval` prints, and a run's metrics-vs-step plot."""

from __future__ import annotations

import os
from pathlib import Path

from trainer.evals.scoring import IF_METRICS, SUMMARY_METRICS


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def results_table(entries: list[dict], title: str):
    from rich.table import Table

    table = Table(title=title, caption="IF metrics, rougeL, task accuracy (answers that state the prompt's `answer`) and EOS (answers that ended) in percent")
    for name, justify in [("run", "left"), ("checkpoint", "left"), ("step", "right"), ("val loss", "right"),
                          ("prompt strict", "right"), ("prompt loose", "right"), ("inst strict", "right"),
                          ("inst loose", "right"), ("rougeL", "right"), ("task acc", "right"), ("mean len", "right"), ("EOS", "right"),
                          ("from", "left")]:
        table.add_column(name, justify=justify, overflow="fold")
    for e in entries:
        s = e["summary"]
        table.add_row(e["run"] or "-", e["checkpoint"] + (f" · {e['adapter']}" if e.get("adapter") else ""), "-" if e["step"] is None else str(e["step"]),
                      "-" if e["val_loss"] is None else f"{e['val_loss']:.4f}",
                      *[_pct(s.get(m)) for m in SUMMARY_METRICS],
                      "-" if s.get("mean_length") is None else f"{s['mean_length']:.1f}", _pct(s.get("eos_rate")),
                      "cached" if e["cached"] else "new")
    return table


def plot_points(entries: list[dict]) -> list[dict]:
    """The entries to plot, in step order: every one that records a step, final/ only where its step
    (it is a copy of that step's folder) is not plotted already, so `trainer eval final/` alone
    still gives a plot."""
    stepped = [e for e in entries if e["step"] is not None]
    steps = {e["step"] for e in stepped if e["checkpoint"] != "final"}
    return sorted((e for e in stepped if e["checkpoint"] != "final" or e["step"] not in steps),
                  key=lambda e: (e["step"], e["checkpoint"] == "final"))


def plot_run(run_dir: Path, entries: list[dict], prompts_name: str) -> Path | None:
    """<run>/eval/metrics.png: each metric against step for the run's evaluated checkpoints (see
    plot_points); None when none of them records a step."""
    points = plot_points(entries)
    if not points:
        return None
    # The object-oriented API on an Agg canvas: no pyplot, so no global backend switch and no
    # figure registry shared with whatever else runs in the process (the web app's threads).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    steps = [e["step"] for e in points]
    panels = [
        ("instruction following (%)", [(m, 100) for m in IF_METRICS]),
        ("task accuracy, ROUGE-L, finished, distinct-2 (%)",
         [("task_accuracy", 100), ("rougeL", 100), ("eos_rate", 100), ("distinct_2", 100)]),
        ("mean length (words)", [("mean_length", 1)]),
    ]
    fig = Figure(figsize=(15, 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels))
    losses = [e.get("val_loss") for e in points]
    if any(v is not None for v in losses):  # the loss the run steered by, beside what it generates
        twin = axes[-1].twinx()
        twin.plot(steps, losses, marker="s", linestyle="--", color="grey", label="val_loss")
        twin.set_ylabel("val loss")
        twin.legend(fontsize=8, loc="lower right")
    for ax, (title, metrics) in zip(axes, panels):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for metric, scale in metrics:
            values = [e["summary"].get(metric) for e in points]
            if any(v is not None for v in values):
                ax.plot(steps, [None if v is None else v * scale for v in values], marker="o", label=metric)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"{run_dir.name} on {prompts_name}")
    fig.tight_layout()
    out = run_dir / "eval" / "metrics.png"
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, out)
    return out
