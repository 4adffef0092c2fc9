"""Command dispatch. Each command module exposes `main(argv) -> int`; a StepwiseError becomes one line."""

import argparse
import importlib
import sys

from trainer.errors import StepwiseError

class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error instead of its usage block (every Stepwise command uses it)."""

    def error(self, message):
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


COMMANDS = {
    "train": ("trainer.train", "fine-tune a model and write checkpoints"),
    "plan": ("trainer.plan", "print the epochs/steps/time table for a config"),
    "eval": ("trainer.evaluate", "generate on held-out prompts with checkpoints and score them"),
    "score": ("trainer.score_cmd", "score responses made elsewhere (IFEval's format)"),
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
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return module.main(rest) or 0
    except StepwiseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
