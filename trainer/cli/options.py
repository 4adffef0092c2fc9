"""The train and plan flags: one per config field, built from the config dataclasses by transformers'
HfArgumentParser (types, `--flag [true|false]` booleans, `--no_flag`, help from each field's doc).

Flags that are not given stay absent (their default is argparse.SUPPRESS), because what a user gave
decides precedence: defaults (or the demo preset) < YAML < flags (trainer.core.config.resolve).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import HfArgumentParser

from trainer.cli.args import OneLineErrors
from trainer.core.config import SECTIONS, Config, config_fields, read_yaml, resolve


class ConfigParser(OneLineErrors, HfArgumentParser):
    """HfArgumentParser over the config sections, with --config and one-line errors."""


def _none_or(kind):
    """`--max_steps none` for an optional field (HfArgumentParser only takes the value's type)."""
    def parse(text: str):
        return None if text.lower() in ("none", "null") else kind(text)

    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def config_parser(prog: str, description: str) -> ConfigParser:
    parser = ConfigParser(list(SECTIONS.values()), prog=prog, description=description)
    parser.add_argument("--config", default=argparse.SUPPRESS, help="YAML run config (defaults < YAML < flags)")
    fields = config_fields()
    for action in parser._actions:
        if action.dest == "help":
            continue
        action.default = argparse.SUPPRESS
        _, field = fields.get(action.dest, (None, None))
        if field is not None and field.default is None and action.type is not None:
            action.type = _none_or(action.type)
    return parser


def given(args: argparse.Namespace) -> tuple[dict, str]:
    """The values a user gave (YAML file, then flags) and the config's name; defaults not included."""
    values: dict = {}
    config_name = "default"
    if getattr(args, "config", None):
        values.update(read_yaml(args.config))
        config_name = Path(args.config).stem
    values.update({k: v for k, v in vars(args).items() if k in config_fields()})
    return values, config_name


def parse_config(argv: list[str], prog: str = "python -m trainer train", description: str = "") -> Config:
    return resolve(*given(config_parser(prog, description).parse_args(argv)))
