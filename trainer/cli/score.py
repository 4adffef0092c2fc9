"""`python -m trainer score --prompts FILE --responses FILE [--output FILE.json]`.

Scores responses made elsewhere (IFEval's response format: `{"prompt", "response"}` per line),
matched to the held-out prompts by prompt text as IFEval's evaluation_lib does.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from trainer.cli.args import ArgumentParser
from trainer.core.errors import StepwiseError
from trainer.core.files import read_jsonl, write_json_atomic
from trainer.evals import scoring
from trainer.evals.prompts import HeldoutPrompt, load_prompts

# How the table shows each summarize() value: its label, and whether it is a fraction (shown in percent).
LABELS = {
    "if_prompt_strict": ("IFEval prompt-level strict", "pct"),
    "if_prompt_loose": ("IFEval prompt-level loose", "pct"),
    "if_inst_strict": ("IFEval instruction-level strict", "pct"),
    "if_inst_loose": ("IFEval instruction-level loose", "pct"),
    "rougeL": ("ROUGE-L F (vs reference)", "pct"),
    "task_accuracy": ("task accuracy (states the answer)", "pct"),
    "mean_length": ("mean length (words)", "num"),
    "distinct_2": ("distinct bigrams", "pct"),
    "eos_rate": ("finished (EOS) rate", "pct"),
    "n": ("prompts", "int"),
}
METRICS = [(name, *LABELS[name]) for name in (*scoring.SUMMARY_METRICS, "mean_length", "distinct_2", "eos_rate", "n")]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m trainer score", description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", required=True, type=Path, help="held-out prompt file (JSON Lines)")
    parser.add_argument("--responses", required=True, type=Path,
                        help='responses, one {"prompt": ..., "response": ...} object per line')
    parser.add_argument("--output", type=Path, help="write per-prompt results and the summary here (JSON)")
    return parser.parse_args(argv)


def load_responses(path: Path) -> dict[str, str]:
    """prompt text -> response. A later line for the same prompt wins, as in IFEval's dict."""
    responses: dict[str, str] = {}
    for _line, where, row in read_jsonl(path, "responses file"):
        if not isinstance(row, dict):
            raise StepwiseError(f"{where}: expected a JSON object with `prompt` and `response`")
        if not isinstance(row.get("response"), str):
            raise StepwiseError(f"{where}: no `response` string on this line")
        if not isinstance(row.get("prompt"), str):
            raise StepwiseError(f"{where}: no `prompt` string on this line (responses are matched by prompt)")
        responses[row["prompt"]] = row["response"]
    return responses


def match(prompts: list[HeldoutPrompt], responses: dict[str, str], prompts_path: Path,
          responses_path: Path) -> list[str]:
    # Exact text first (IFEval); then ignoring surrounding whitespace, which JSONL writers often trim.
    stripped = {p.strip(): r for p, r in responses.items()}
    matched, missing = [], []
    for p in prompts:
        response = responses.get(p.prompt, stripped.get(p.prompt.strip()))
        if response is None:
            missing.append(p)
        matched.append(response)
    if missing:
        raise StepwiseError(
            f"{responses_path}: no response for {len(missing)} of {len(prompts)} prompts in {prompts_path} "
            f"(first: key {missing[0].key!r}, line {missing[0].line})"
        )
    return matched


def check_output(path: Path) -> None:
    """A StepwiseError naming --output unless a file can be written at path: not a folder, and its
    parent a folder, or creatable (the nearest existing ancestor a writable folder). Nothing is created."""
    if path.is_dir():
        raise StepwiseError(f"--output {path}: is a directory, expected a JSON file path")
    parent = path.parent
    while not parent.exists():
        if parent.is_symlink():  # a dangling link: mkdir would fail on it
            raise StepwiseError(f"--output {path}: {parent} is a broken symbolic link")
        parent = parent.parent
    if not parent.is_dir():
        raise StepwiseError(f"--output {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StepwiseError(f"--output {path}: cannot write in {parent} (permission denied)")


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "n/a"
    if kind == "pct":
        return f"{100 * value:.2f} %"
    return f"{value:.2f}" if kind == "num" else str(value)


def metrics_table(summary: dict[str, Any], title: str) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, label, kind in METRICS:
        if name in summary and not (name == "eos_rate" and summary[name] is None):
            table.add_row(f"{label} ({name})", _fmt(summary[name], kind))
    return table


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.output is not None:
        check_output(args.output)  # before scoring: a bad path must not cost a whole scoring run
    prompts = load_prompts(args.prompts)
    responses = load_responses(args.responses)
    matched = match(prompts, responses, args.prompts, args.responses)
    results = [scoring.score_response(p, r) for p, r in zip(prompts, matched)]
    summary = scoring.summarize(results)
    Console().print(metrics_table(summary, f"{args.responses.name} on {args.prompts.name}"))
    extra = len({r.strip() for r in responses} - {p.prompt.strip() for p in prompts})
    if extra:
        print(f"note: {extra} responses answer prompts not in {args.prompts} and were ignored")
    if args.output is not None:
        write_json_atomic(args.output, {
            "prompts": str(args.prompts),
            "responses": str(args.responses),
            "summary": summary,
            "results": results,
        })
        print(f"wrote {args.output}")
    return 0
