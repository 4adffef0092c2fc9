"""The command line: `python -m trainer {train,plan,eval,score}`. Each command module exposes
`main(argv) -> int`; trainer.cli.args.run_command turns a user's mistake into one line and exit 2.
This layer may import every other layer of trainer; nothing in trainer imports it."""

from __future__ import annotations

import importlib
import sys

from trainer.cli.args import run_command

COMMANDS = {
    "train": ("trainer.cli.train", "fine-tune a model and write checkpoints"),
    "plan": ("trainer.cli.plan", "print the epochs/steps/time table for a config"),
    "eval": ("trainer.cli.evaluate", "generate on held-out prompts with checkpoints and score them"),
    "score": ("trainer.cli.score", "score responses made elsewhere (IFEval's format)"),
}

USAGE = "usage: python -m trainer {" + ",".join(COMMANDS) + "} [options]\n\n" + "\n".join(
    f"  {name:<6} {doc}" for name, (_, doc) in COMMANDS.items()
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return run_command(importlib.import_module(COMMANDS[name][0]).main, rest)
