"""`python -m trainer eval [CKPT ...] --prompts FILE`: generate on held-out prompts with checkpoints,
score them, and report one row per checkpoint.

CKPT is a step folder, final/, a run folder (all its checkpoints), any Hugging Face model folder or a
.gguf file (converted once); none means every checkpoint of the newest run under --root. Results (per-prompt rows and the summary)
go to <run>/eval/<checkpoint>-<key>.json, where the key hashes what decides the answers: the weights
file's path, size and mtime, the prompt file's content, --limit and the generation settings. A second
identical evaluation reads that file instead of generating. A PNG of every metric against step is
written to <run>/eval/metrics.png (final/ is a point at its step unless that step folder is
evaluated too). Generation and scoring are trainer.evals.heldout's, the path the trainer, the web
app and the REPL use too. With stderr not a terminal (a log file, a pipe) the progress bar becomes
plain lines: one as each checkpoint starts, and one whenever nothing was printed for 30 seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from trainer.cli.args import ArgumentParser
from trainer.core.catalog import (
    CheckpointInfo,
    checkpoint_info,
    is_checkpoint,
    newest_run,
    read_run,
    weights_identity,
)
from trainer.core.errors import StepwiseError
from trainer.core.files import file_sha256, read_json, write_json_atomic
from trainer.core.resources import user_or_packaged
from trainer.evals.heldout import heldout_samples
from trainer.evals.report import plot_run, results_table
from trainer.inference.adapters import BaseModels
from trainer.inference.generate import GenerationSettings
from trainer.inference.gguf import gguf_folder, is_gguf
from trainer.inference.loading import (
    check_device,
    check_model_folder,
    is_hub_id,
    load_model,
)
from trainer.training.progress import Heartbeat, duration

DEFAULT_PROMPTS = "eval_prompts/demo_ifeval.jsonl"
CACHE_VERSION = 1  # bump when the result file's content or the scoring changes meaning


# --- what to evaluate ----------------------------------------------------------------------------

@dataclass
class Target:
    """One checkpoint to evaluate, and where its results go."""

    path: str
    """The folder (or hub id) to load."""
    name: str
    """step-000010, final, or the folder's name."""
    info: CheckpointInfo | None
    """What its run recorded (step, val loss), when it sits in a run."""
    out_dir: Path
    """<run>/eval, or <root>/eval for a folder outside any run."""

    @property
    def run_dir(self) -> Path | None:
        return self.info.path.parent if self.info is not None else None


def _run_targets(run_dir: Path) -> list[Target]:
    """Every checkpoint of a run; final/ only when its step is not also a step folder (it is a copy)."""
    run = read_run(run_dir)
    steps = {c.step for c in run.checkpoints if not c.is_final}
    out = []
    for info in run.checkpoints:
        if info.is_final and info.step in steps:
            continue
        check_model_folder(info.path)
        out.append(Target(str(info.path), info.path.name, info, run_dir / "eval"))
    return out


def expand(specs: list[str], root: str | Path) -> list[Target]:
    """The checkpoints the arguments name, every folder checked before anything is generated."""
    if not specs:
        run = newest_run(root)
        return _run_targets(run.path)
    targets: list[Target] = []
    for spec in specs:
        p = Path(spec)
        if is_checkpoint(p) or (p / "config.json").is_file():
            check_model_folder(p)
            info = checkpoint_info(p)
            out_dir = p.parent / "eval" if info is not None else Path(root) / "eval"
            targets.append(Target(str(p), p.name, info, out_dir))
        elif p.is_dir() and read_run(p).checkpoints:
            targets += _run_targets(p)
        elif is_gguf(p) and p.is_file():
            gguf_folder(p, flag="")  # converted (or found converted) now: a damaged file stops before any generation
            targets.append(Target(str(p), p.stem, None, Path(root) / "eval"))
        elif p.is_dir():
            raise StepwiseError(f"{spec}: not a checkpoint, run folder or Hugging Face model folder "
                                "(no config.json, no step-*/ or final/)")
        elif is_hub_id(spec):
            targets.append(Target(spec, spec.replace("/", "--"), None, Path(root) / "eval"))
        else:
            raise StepwiseError(f"{spec}: no such checkpoint or run folder")
    seen, unique = set(), []
    for t in targets:
        key = str(Path(t.path).resolve()) if Path(t.path).exists() else t.path
        if key not in seen:
            seen.add(key)
            unique.append(t)
    return unique


# --- the result cache ----------------------------------------------------------------------------

def cache_key(target: Target, prompts_sha: str, limit: int | None, settings: GenerationSettings, device: str) -> str:
    """What decides the answers. Not the batch size: batched answers equal one-at-a-time ones."""
    spec = {"version": CACHE_VERSION, "model": model_identity(target.path), "prompts": prompts_sha,
            "limit": limit, "settings": dataclasses.asdict(settings), "device": device.split(":")[0]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def model_identity(path: str) -> dict:
    """weights_identity, or for a .gguf file its own path, size and mtime (the file is the weights)."""
    if is_gguf(path) and Path(path).is_file():
        stat = Path(path).stat()
        return {"weights": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return weights_identity(path)


# --- contamination -------------------------------------------------------------------------------

def run_contamination(run_dir: Path, prompts: list, prompts_sha: str, console) -> dict | None:
    """Held-out prompts found in the run's own training split (re-created from config.yaml); cached
    under <run>/eval since re-creating a dataset takes a while. None when it cannot be re-created."""
    from trainer.core.config import load_saved
    from trainer.evals.contamination import check_prompts_against_records
    from trainer.training.data import load_train_val

    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        return None
    key = hashlib.sha256(config_file.read_bytes() + prompts_sha.encode() + str(len(prompts)).encode()).hexdigest()[:12]
    cached = run_dir / "eval" / f"contamination-{key}.json"
    try:
        cfg = load_saved(config_file)
        d = cfg.data
        templated = d.dataset == "demo"  # the demo's prompts share its templates' wording (see warn)
        if cached.is_file():
            return {**read_json(cached), "templated": templated}
        if not (templated or Path(d.dataset).exists()):  # a hub dataset is not fetched again for this
            console.print(f"[dim]contamination check skipped for {run_dir.name}: {d.dataset} is not a local file[/]")
            return None
        with console.status(f"checking the held-out prompts against {run_dir.name}'s training data"):
            train, _, _ = load_train_val(d.dataset, d.val_dataset, d.val_fraction, cfg.optim.seed, d.strict,
                                         d.demo_records)
            found = check_prompts_against_records([p.prompt for p in prompts], train, keys=[p.key for p in prompts])
    except StepwiseError as err:
        console.print(f"[dim]contamination check skipped for {run_dir.name}: {err}[/]")
        return None
    found["templated"] = templated
    cached.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cached, found)
    return found


# --- the command ---------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    defaults = GenerationSettings()
    parser = ArgumentParser(prog="python -m trainer eval", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="*", metavar="CKPT",
                        help="step folder, final/, run folder or Hugging Face folder (default: the newest run)")
    parser.add_argument("--prompts", default=DEFAULT_PROMPTS, help=f"held-out prompt file (default {DEFAULT_PROMPTS})")
    parser.add_argument("--root", default="checkpoints", help="where runs live (default checkpoints)")
    parser.add_argument("--limit", type=int, help="only the first N prompts")
    parser.add_argument("--max_new_tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--batch_size", type=int, default=16, help="prompts generated together")
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0 is greedy")
    parser.add_argument("--top_p", type=float, default=defaults.top_p)
    parser.add_argument("--top_k", type=int, default=defaults.top_k)
    parser.add_argument("--repetition_penalty", type=float, default=defaults.repetition_penalty)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--no_cache", action="store_true", help="generate again even when a result file exists")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from trainer.evals.contamination import warn
    from trainer.evals.prompts import load_prompts

    args = parse_args(argv)
    # Everything a user can get wrong is checked here, before a model loads or a file is written.
    if args.limit is not None and args.limit <= 0:
        raise StepwiseError(f"--limit must be positive, got {args.limit}")
    if args.batch_size <= 0:
        raise StepwiseError(f"--batch_size must be positive, got {args.batch_size}")
    device = check_device(args.device)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                  top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)
    prompts_path = user_or_packaged(args.prompts)  # the default is found from any folder
    prompts = load_prompts(prompts_path)[: args.limit]
    prompts_sha = file_sha256(prompts_path)
    targets = expand(args.checkpoints, args.root)
    bases = BaseModels()  # the adapters of one run load their base once

    # Piped output (tests, logs, `| tee`) gets a table wide enough for its thirteen columns unfolded.
    out = Console() if sys.stdout.isatty() else Console(width=200)
    err = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=200)
    for run_dir in dict.fromkeys(t.run_dir for t in targets if t.run_dir is not None):
        found = run_contamination(run_dir, prompts, prompts_sha, err)
        if found is not None:
            warn(found, err, f"{run_dir.name}'s training data", templated=found.get("templated", False))

    entries = []
    todo = []
    for t in targets:
        key = cache_key(t, prompts_sha, args.limit, settings, device)
        result_file = t.out_dir / f"{t.name}-{key}.json"
        if result_file.is_file() and not args.no_cache:
            entry = read_json(result_file)
            entry["cached"] = True
            out.print(f"cached: {t.name} ({result_file})")
        else:
            entry = None
            todo.append(len(entries))
        entries.append({"target": t, "file": result_file, "entry": entry})

    def done(i: int) -> None:
        entries[i]["file"].parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(entries[i]["file"], {k: v for k, v in entries[i]["entry"].items() if k != "cached"})

    def say(text: str) -> None:
        err.print(text, markup=False, highlight=False)

    if todo and err.is_terminal:
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn()]
        with Progress(*columns, console=err) as progress:
            task = progress.add_task("generating", total=len(todo) * len(prompts))
            for n, i in enumerate(todo):
                t = entries[i]["target"]
                progress.update(task, description=f"{t.name} ({n + 1}/{len(todo)})")
                entries[i]["entry"] = evaluate_one(t, prompts, settings, args, device, prompts_sha,
                                                   lambda done, base=n * len(prompts): progress.update(
                                                       task, completed=base + done), bases)
                done(i)
    elif todo:  # a live bar shows nothing in a file or a pipe: plain lines instead
        generate_plain(entries, todo, prompts, lambda t, on_batch: evaluate_one(
            t, prompts, settings, args, device, prompts_sha, on_batch, bases), say, done)

    rows = [e["entry"] for e in entries]
    out.print(results_table(rows, f"{prompts_path.name}: {len(prompts)} prompts, {_describe(settings)}"))
    by_run: dict[Path, list[dict]] = {}
    for e in entries:
        if e["target"].run_dir is not None:
            by_run.setdefault(e["target"].run_dir, []).append(e["entry"])
    for run_dir, run_rows in by_run.items():
        png = plot_run(run_dir, run_rows, prompts_path.name)
        if png is not None:
            out.print(f"plot: {png}")
        else:
            out.print(f"no plot for {run_dir.name}: none of its evaluated checkpoints records a step")
    for e in entries:
        if not e["entry"]["cached"]:
            out.print(f"wrote {e['file']}")
    return 0


def generate_plain(entries: list[dict], todo: list[int], prompts: list, evaluate, say, done) -> None:
    """The progress bar as plain lines: one as each checkpoint starts, and a Heartbeat line (prompts
    done, time, ETA) whenever nothing was said for the heartbeat's interval."""
    total = len(todo) * len(prompts)
    where = {"name": "", "n": 0, "done": 0}

    def status(elapsed: float) -> str:
        finished = where["n"] * len(prompts) + where["done"]
        eta = f", ETA {duration(elapsed / finished * (total - finished))}" if finished else ""
        return (f"generating with {where['name']} ({where['n'] + 1}/{len(todo)}): {where['done']}/{len(prompts)} "
                f"prompts; {finished}/{total} in all, {duration(elapsed)} elapsed{eta}")

    def on_batch(count: int) -> None:
        where["done"] = count

    with Heartbeat(status, say) as beat:
        for n, i in enumerate(todo):
            t = entries[i]["target"]
            where.update(name=t.name, n=n, done=0)
            say(f"generating with {t.name} ({n + 1}/{len(todo)}): {len(prompts)} prompts")
            beat.touch()
            entries[i]["entry"] = evaluate(t, on_batch)
            done(i)


def _silent(text: str) -> None:
    pass


def _describe(settings: GenerationSettings) -> str:
    mode = "greedy" if settings.greedy else f"T={settings.temperature} top_p={settings.top_p} seed={settings.seed}"
    return f"{mode}, max {settings.max_new_tokens} new tokens"


def evaluate_one(t: Target, prompts: list, settings: GenerationSettings, args, device: str, prompts_sha: str,
                 on_batch, bases: BaseModels | None = None) -> dict:
    loaded = load_model(t.path, device, log=_silent, bases=bases)  # a .gguf file's conversion was reported by expand()
    t0 = time.perf_counter()
    rows, summary = heldout_samples(loaded.model, loaded.tokenizer, prompts, settings, args.batch_size, on_batch)
    seconds = time.perf_counter() - t0
    info = t.info
    return {
        "checkpoint": t.name,
        "path": t.path,
        "run": info.run if info else None,
        "step": info.step if info else None,
        "val_loss": info.val_loss if info else None,
        "adapter": info.adapter if info else None,
        "prompts": str(args.prompts),
        "prompts_sha256": prompts_sha,
        "limit": args.limit,
        "settings": dataclasses.asdict(settings),
        "device": device,
        "model": model_identity(t.path),
        "seconds": round(seconds, 3),
        "new_tokens": sum(r["new_tokens"] for r in rows),
        "summary": summary,
        "results": rows,
        "cached": False,
    }
