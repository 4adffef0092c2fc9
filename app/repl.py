"""`python -m app.repl`: checkpoints side by side in the terminal, and held-out spot checks.

    python -m app.repl [CKPT ...] [--root checkpoints] [--prompt TEXT | --spot-check N] [--prompts FILE]
                       [--plain] [--max_new_tokens N] [--temperature T] [--top_p P] [--top_k K]
                       [--repetition_penalty R] [--seed S]

CKPT is a checkpoint folder (`checkpoints/run/step-000500`, `.../final`), a run folder (its spread is
used, as below), or either of those relative to --root. With no CKPT: the newest run under --root,
at most 4 panels spread across it: final/ plus the first, the last and evenly spaced periodic
checkpoints in between (a step folder that final/ is a copy of is left out: it would answer the same).

Typing a line sends it to every panel; each panel keeps its own multi-turn history, formatted with
its checkpoint's own chat template. Commands (Tab completes, Up recalls; the loop is app/repl_loop.py):

    /models  /load CKPT|N  /drop N  /params [key=value ...]  /heldout [N]  /score [KEY | ID [k=v ...]]
    /reset  /save FILE(.md|.json)  /help  /quit

`--prompt TEXT` answers once in every panel and exits (1 when a panel failed). `--spot-check N`
generates answers to N held-out prompts (a sample seeded by --seed, default 0, so reruns agree) with
every checkpoint, scores them, prints one row per checkpoint and exits 0.

Output is rich panels and tables when stdout is a terminal, else plain (or with --plain). The plain
spot-check output is tab-separated: a header line, then one line per checkpoint in panel order:

    checkpoint  step  val_loss  n  if_prompt_strict  if_prompt_loose  if_inst_strict  if_inst_loose
    rougeL  mean_length  distinct_2  eos_rate  path

`checkpoint` is `run/folder`; fractions are in [0, 1] with 4 decimals; `nan` where a value does not
apply (no IFEval instructions among the prompts, no references, no val loss). Progress goes to stderr.
Mistakes (bad arguments, no checkpoints, a folder that does not load) are one line on stderr, exit 2;
inside the REPL they are one line and the REPL goes on.
"""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from pathlib import Path

from app.catalog import checkpoint_id, fmt
from app.chatio import ChatIO, PlainChatIO, RichChatIO
from app.repl_loop import METRICS, CommandCompleter, Repl, resolve, run_selection, summary_row
from app.session import CompareSession, ModelCache
from trainer.cli.args import ArgumentParser, run_command
from trainer.core.catalog import checkpoint_label, newest_run
from trainer.core.resources import user_or_packaged
from trainer.evals.heldout import heldout_samples
from trainer.evals.prompts import load_prompts
from trainer.inference.generate import GenerationSettings

DEFAULT_PROMPTS = "eval_prompts/demo_ifeval.jsonl"  # from the working folder, else the packaged copy
SPOT_HEADER = ("checkpoint", "step", "val_loss", "n", *METRICS, "path")


# --- which checkpoints ---------------------------------------------------------------------------

def pick_checkpoints(args: list[str], root: Path) -> list[Path]:
    if not args:
        return run_selection(newest_run(root))
    return [p for a in args for p in resolve(a, root)]


# --- without a person ----------------------------------------------------------------------------

def spot_check(paths: list[Path], cache, settings: GenerationSettings, prompts_path: str, n: int,
               io: ChatIO) -> int:
    pool = load_prompts(prompts_path)
    chosen = random.Random(settings.seed or 0).sample(pool, min(n, len(pool)))
    plain = isinstance(io, PlainChatIO)
    rows = []
    for k, path in enumerate(paths, 1):
        t0 = time.perf_counter()
        loaded = cache.get(path)
        _, s = heldout_samples(loaded.model, loaded.tokenizer, chosen, settings)
        info = loaded.info
        if plain:
            rows.append([checkpoint_id(path), fmt(info.step if info else None),
                         fmt(info.val_loss if info else None), str(s["n"])] + [fmt(s[m]) for m in METRICS]
                        + [str(path)])
        else:  # a terminal is read by eye: the panel titles, 3 digits, no paths
            rows.append(summary_row(checkpoint_label(path), s))
        print(f"spot-check {k}/{len(paths)} {checkpoint_id(path)}: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    if plain:
        io.table(None, SPOT_HEADER, rows)
    else:
        io.table(f"spot check: {len(chosen)} prompts from {prompts_path}", ["checkpoint", "n", *METRICS], rows)
    return 0


# --- entry ---------------------------------------------------------------------------------------

def parse_args(argv):
    ap = ArgumentParser(prog="python -m app.repl", description="Compare checkpoints side by side in the terminal.")
    ap.add_argument("ckpts", nargs="*", metavar="CKPT", help="checkpoint or run folders (default: newest run)")
    ap.add_argument("--root", default="checkpoints", help="where runs live (default: checkpoints)")
    ap.add_argument("--prompt", help="answer this once in every panel and exit")
    ap.add_argument("--spot-check", "--spot_check", type=int, metavar="N", dest="spot_check",
                    help="score N held-out prompts per checkpoint, print a table, exit")
    ap.add_argument("--prompts", default=DEFAULT_PROMPTS, help=f"held-out prompt file (default {DEFAULT_PROMPTS})")
    ap.add_argument("--plain", action="store_true", help="plain output even on a terminal")
    defaults = GenerationSettings()
    for f in dataclasses.fields(GenerationSettings):
        kind = int if str(f.type).startswith("int") else float
        ap.add_argument(f"--{f.name}", type=kind, default=getattr(defaults, f.name), help=f"generation: {f.name}")
    args = ap.parse_args(argv)
    args.prompts = str(user_or_packaged(args.prompts))  # eval_prompts/... works from any folder
    if args.spot_check is not None and args.spot_check < 1:
        ap.error(f"--spot-check N must be at least 1, got {args.spot_check}")
    if args.prompt is not None and args.spot_check is not None:
        ap.error("--prompt and --spot-check do not go together")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_command(command, sys.argv[1:] if argv is None else argv)


def command(argv: list[str]) -> int:
    args = parse_args(argv)
    root = Path(args.root)
    settings = GenerationSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(GenerationSettings)})
    paths = pick_checkpoints(args.ckpts, root)
    plain = args.plain or not sys.stdout.isatty()
    if args.spot_check is not None:
        load_prompts(args.prompts)  # a bad prompt file fails before any model loads
        io = PlainChatIO() if plain else RichChatIO()
        return spot_check(paths, ModelCache(), settings, args.prompts, args.spot_check, io)
    # No root for the session: its confinement is for the web app; here any folder may be compared.
    session = CompareSession([str(p) for p in paths], settings=settings)
    repl = Repl(session, PlainChatIO() if plain else RichChatIO(), root, args.prompts)
    if not plain and args.prompt is None:
        repl.io = RichChatIO(completer=CommandCompleter(repl))
        print(f"loading {len(paths)} checkpoint(s)…", file=sys.stderr, flush=True)
    for side in session.sides:
        repl.load(side.path)  # every model up front: a broken folder is an exit-2 line now, not a red panel
    if args.prompt is not None:
        repl.ask(args.prompt)
        return 1 if any(s.error for s in session.sides) else 0
    return repl.run()


if __name__ == "__main__":
    sys.exit(main())
