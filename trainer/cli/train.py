"""`python -m trainer train`: fine-tune a causal LM on instruction data, checkpointing every N steps."""

from __future__ import annotations

from trainer.cli.options import parse_config
from trainer.training.loop import train


def main(argv: list[str]) -> int:
    return train(parse_config(argv, "python -m trainer train", __doc__.split(": ", 1)[1]))
