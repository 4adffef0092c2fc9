"""`python -m trainer plan`: epochs, steps and time for a config (the same flags as train)."""

from __future__ import annotations

from rich.console import Console

from trainer.cli.options import config_parser, given
from trainer.core.config import resolve
from trainer.training.plan import make_plan, render


def main(argv: list[str]) -> int:
    parser = config_parser("python -m trainer plan", __doc__.split(": ", 1)[1])
    parser.add_argument("--timing_steps", type=int, default=3, help="steps to time when no earlier run recorded a speed (0: skip)")
    args = parser.parse_args(argv)
    timing_steps = args.timing_steps
    del args.timing_steps
    if timing_steps < 0:
        parser.error(f"--timing_steps must be >= 0, got {timing_steps}")
    cfg = resolve(*given(args))
    console = Console(highlight=False, soft_wrap=True)
    render(make_plan(cfg, timing_steps, console), console)
    return 0
