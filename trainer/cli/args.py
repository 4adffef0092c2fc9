"""What every Stepwise command line shares: argparse with one-line errors, and the one exit-2 boundary."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from trainer.core.errors import StepwiseError


class OneLineErrors:
    """argparse's error() as one line naming the command, exit 2, instead of its usage block."""

    def error(self, message):
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


class ArgumentParser(OneLineErrors, argparse.ArgumentParser):
    """The parser of every Stepwise command."""


def run_command(main: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """Call a command's main: a user's mistake (StepwiseError) is one line and exit 2, Ctrl-C while it
    loads or works is exit 130; neither prints a traceback."""
    try:
        return main(argv) or 0
    except StepwiseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
