"""What the web app's tabs share: the server's settings, the checkpoint catalogue, and the guard that
keeps every value a browser or API client sends inside the root.

Checkpoints travel between browser and server as paths relative to the root (`run/step-000500`),
never as absolute paths; `resolve_checkpoint` is the one place such a value becomes a folder. A run
or checkpoint folder that resolves outside the root (a symlink to elsewhere) is left out of every
list, and nothing a client sees names a path outside the root or the root's own absolute path
(`public`). A value the guard refuses is one line in the server's log (`log_line`), never a traceback.
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from app.catalog import fmt as catalog_fmt
from app.catalog import keep_choice, spread
from trainer.core.catalog import RunInfo, is_checkpoint, list_runs, read_run
from trainer.core.errors import StepwiseError, first_line
from trainer.core.resources import data_path
from trainer.inference.generate import GenerationSettings

MIN_SIDES, MAX_SIDES = 2, 4
SIDE_NAMES = "ABCD"


@dataclass
class WebConfig:
    """How the server was started (`python -m app.web --help`)."""

    root: Path
    """Folder of runs; nothing outside it is ever loaded or read for a browser."""
    prompt_files: list[Path] = field(default_factory=list)
    """Held-out prompt files offered by the random-prompt button and the Eval tab."""
    max_new_tokens: int = 512
    """Cap on max new tokens, whatever a client asks for."""
    max_prompt_chars: int = 4000
    """Longest prompt accepted."""
    cache_bytes: int = 4 << 30
    """Memory budget of the loaded-model cache."""
    concurrency: int = 1
    """Generation requests served at once; the rest wait in the queue."""

    def __post_init__(self):
        self.root = Path(self.root).resolve()
        if not self.prompt_files:
            # The IFEval-style file first: its constraints are what the demo is about.
            self.prompt_files = sorted(data_path("eval_prompts").glob("*.jsonl"), key=lambda p: "ifeval" not in p.name)


# --- what a client may see, and the server's log ---------------------------------------------------

def public(root: Path, text) -> str:
    """`text` as a client may see it: paths under the root relative to it, the root itself unnamed (its
    absolute path says where the server keeps its files)."""
    base = str(root)
    return str(text).replace(base + os.sep, "").replace(base, "the root")


def log_line(text: str) -> None:
    """One line in the server's log (stderr, where gradio logs): a refused value, a skipped folder."""
    print(f"stepwise web: {' '.join(str(text).split())}", file=sys.stderr, flush=True)


def user_error(text):
    """A gr.Error for a client's mistake: shown in the page, with no traceback in the server's log
    (gradio prints one for every gr.Error unless told not to)."""
    import gradio as gr  # only the page's handlers need it; the guard and catalogue stay importable without

    return gr.Error(str(text), print_exception=False)


def client_error(root: Path, err) -> Exception:
    """user_error for a StepwiseError, its first line without the root's path. (A refusal by the guard
    below has already been logged, in one line, where it was refused.)"""
    return user_error(public(root, first_line(err)))


def _shown(value) -> str:
    """A client's value as the log and messages quote it: repr, at most 120 characters."""
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


# --- the guard -----------------------------------------------------------------------------------

def within(root: Path, path: Path) -> bool:
    """Whether path, symlinks followed, is root or under it (a symlink loop is not)."""
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop, before Python 3.13
        return False


def inside_root(root: Path, value, what: str) -> Path:
    """root / value, refusing anything that is not a plain relative path that stays under root, symlinks
    followed. The refusal quotes the value as sent, never where it leads, and is logged in one line."""
    if not isinstance(value, str) or not value.strip():
        raise StepwiseError(f"no {what} chosen")
    text = value.strip()
    rel_path = Path(text)
    path = None
    if not ("\x00" in text or rel_path.is_absolute() or text.startswith(("~", "\\")) or ".." in rel_path.parts):
        path = root / rel_path
        path = path.resolve() if within(root, path) else None
    if path is None or path == root:
        log_line(f"refused {what} {_shown(text)} from a client: not under the root")
        raise StepwiseError(f"{text!r}: not a {what} under the root (use a name from the list)")
    return path


def resolve_checkpoint(root: Path, value) -> Path:
    """The checkpoint folder a browser's value names; a StepwiseError for anything else."""
    path = inside_root(root, value, "checkpoint")
    if not is_checkpoint(path):
        log_line(f"refused checkpoint {_shown(value)} from a client: no checkpoint there")
        raise StepwiseError(f"{value}: no checkpoint there (refresh the list)")
    return path


def resolve_run(root: Path, value) -> Path:
    path = inside_root(root, value, "run")
    if path.parent != root or not path.is_dir():
        log_line(f"refused run {_shown(value)} from a client: no such run")
        raise StepwiseError(f"{value}: no such run under the root")
    return path


def rel(root: Path, path: Path) -> str:
    return path.resolve().relative_to(root).as_posix()


def readable_file(root: Path, path: Path) -> bool:
    """A file the tabs may read for a client: it exists and, symlinks followed, lies under the root."""
    return path.is_file() and within(root, path)


# --- catalogue -----------------------------------------------------------------------------------

def _guarded(root: Path, run: RunInfo, log: bool = False) -> RunInfo:
    """The run with only the checkpoints that stay under root; with `log`, one line for each left out."""
    kept = []
    for c in run.checkpoints:
        if within(root, c.path):
            kept.append(c)
        elif log:
            log_line(f"skipped {run.name}/{c.path.name}: it links outside the root")
    return dataclasses.replace(run, checkpoints=kept)


def run_info(run_dir: Path, root: Path | None = None) -> RunInfo:
    """read_run of a run folder, keeping only checkpoints under root (default: the run's parent, which
    resolve_run makes the root)."""
    return _guarded((root or run_dir.parent).resolve(), read_run(run_dir))


def runs(root: Path, log: bool = False) -> list[RunInfo]:
    """Every run under root with a checkpoint under root, newest first. A run folder or step folder
    that links outside the root is left out, so the rest of the root still lists; with `log` (once,
    as the server starts, not at every page load) each one left out is a line in the server's log."""
    try:
        found = list_runs(root)
    except (OSError, ValueError):  # a run being written can have a half-renamed folder: list the rest
        return []
    kept = []
    for r in found:
        if not within(root, r.path):
            if log:
                log_line(f"skipped run {r.name}: it links outside the root")
            continue
        r = _guarded(root, r, log)
        if r.checkpoints:
            kept.append(r)
    return kept


def checkpoint_choices(root: Path) -> list[tuple[str, str]]:
    """(label, value) for every checkpoint under root: runs newest first, steps in order, then final;
    the label is the catalogue's CheckpointInfo.label, as in the REPL and the other tabs."""
    return [(c.label, rel(root, c.path)) for r in runs(root) for c in r.checkpoints]


def default_picks(choices: list[tuple[str, str]], n: int) -> list[str | None]:
    """Columns' first picks: the newest run's first and last steps for A and B, steps between for C, D."""
    values = [v for _, v in choices]
    if not values:
        return [None] * n
    run = values[0].split("/")[0]
    in_run = [v for v in values if v.split("/")[0] == run]
    same = [v for v in in_run if not v.endswith("/final")] or values
    picks = spread(same, n)
    picks = [picks[0], picks[-1], *picks[1:-1]] if len(picks) >= 2 else picks
    # Fewer step checkpoints than columns: then final/, then empty columns (never the same one twice).
    picks += [v for v in in_run if v not in picks]
    return (picks + [None] * n)[:n]


def run_choices(root: Path) -> list[str]:
    return [r.name for r in runs(root)]


def prompt_file_choices(cfg: WebConfig) -> list[str]:
    return [p.name for p in cfg.prompt_files]


def resolve_prompt_file(cfg: WebConfig, name) -> Path:
    """Only files the server was started with: a browser never names a path."""
    for p in cfg.prompt_files:
        if p.name == name:
            return p
    raise StepwiseError(f"{name!r}: not one of this server's prompt files")


# --- what the Compare tab and the /compare API both check ----------------------------------------

def settings_from(cfg: WebConfig, temperature, top_p, max_new_tokens, seed) -> GenerationSettings:
    """Clamped to the server's caps whatever the client sent; temperature 0 is greedy."""
    try:
        return GenerationSettings(
            max_new_tokens=max(1, min(int(max_new_tokens or 1), cfg.max_new_tokens)),
            temperature=max(0.0, min(float(temperature or 0.0), 2.0)),
            top_p=max(0.01, min(float(top_p or 1.0), 1.0)),
            seed=int(seed) if seed is not None else 0,
        )
    except (TypeError, ValueError, StepwiseError) as err:
        raise user_error(f"generation settings: {first_line(err)}") from None


def check_prompt(cfg: WebConfig, prompt) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise user_error("Type a prompt first (or draw a held-out one).")
    if len(prompt) > cfg.max_prompt_chars:
        raise user_error(f"The prompt has {len(prompt)} characters; this server takes at most {cfg.max_prompt_chars}.")
    return prompt


# --- formatting ----------------------------------------------------------------------------------

def esc(text) -> str:
    return html.escape(str(text), quote=True)


def fmt(value, digits: int = 3) -> str:
    """catalog.fmt as the page shows numbers: 3 decimals, `-` for a missing value."""
    return catalog_fmt(value, digits, missing="-")


def refresh_runs(root: Path, current):
    """A run dropdown with the runs under root now, keeping `current` while it still exists."""
    import gradio as gr

    names = run_choices(root)
    return gr.Dropdown(choices=names, value=keep_choice(names, current))


def constraints_html(instruction_ids: list[str], kwargs: list[dict] | None, reference: str | None) -> str:
    """A held-out prompt's checks and reference answer."""
    parts = []
    if instruction_ids:
        items = []
        for i, iid in enumerate(instruction_ids):
            kw = {k: v for k, v in ((kwargs or [{}] * len(instruction_ids))[i] or {}).items() if v is not None}
            extra = f" <code>{esc(json.dumps(kw, ensure_ascii=False))}</code>" if kw else ""
            items.append(f"<li><code>{esc(iid)}</code>{extra}</li>")
        parts.append(f"<b>Constraints</b><ul>{''.join(items)}</ul>")
    if reference:
        parts.append(f"<b>Reference</b><div class='sw-ref'>{esc(reference)}</div>")
    return "".join(parts) or "<i>No constraints or reference for this prompt.</i>"


def scores_html(scores: dict | None) -> str:
    """Per-instruction pass/fail (strict, loose), rougeL and task accuracy of one answer."""
    if not scores:
        return ""
    marks = []
    for iid, s, lo in zip(scores.get("instruction_id_list") or [], scores.get("strict") or [],
                          scores.get("loose") or []):
        verdict = "pass" if s else ("loose pass" if lo else "fail")
        cls = "sw-pass" if s else ("sw-loose" if lo else "sw-fail")
        marks.append(f"<li class='{cls}'><code>{esc(iid)}</code>: {verdict}</li>")
    rouge = scores.get("rougeL")
    tail = []
    if rouge is not None:
        tail.append(f"rougeL {rouge:.3f}")
    if scores.get("correct") is not None:
        tail.append("answer right" if scores["correct"] else "answer wrong")
    if scores.get("length") is not None:
        tail.append(f"{scores['length']} words")
    body = f"<ul class='sw-checks'>{''.join(marks)}</ul>" if marks else ""
    return f"<div class='sw-scores'>{body}<span>{' · '.join(tail)}</span></div>"


CSS = """
.sw-scores ul, .sw-checks {margin: 0.2em 0; padding-left: 1.2em;}
.sw-pass {color: #15803d;} .sw-loose {color: #b45309;} .sw-fail {color: #b91c1c;}
.sw-ref {white-space: pre-wrap; border-left: 3px solid #9ca3af; padding-left: 0.6em; margin: 0.3em 0;}
.sw-answer {white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 0.9em;
            background: rgba(127,127,127,0.08); padding: 0.5em; border-radius: 4px; margin: 0.3em 0;}
.sw-step {border: 1px solid rgba(127,127,127,0.3); border-radius: 6px; padding: 0.6em; margin-bottom: 0.6em;}
.sw-best {border-color: #2563eb; border-width: 2px;}
"""
