"""Shared fixtures: a real tiny run of the trainer (demo data, tiny Llama) that later tests read."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

# A few seconds of real training: 3 checkpoints and final/ of the demo preset on a small dataset.
TINY_ARGS = [
    "--demo_records", "600", "--context_length", "128", "--mini_batch_size", "8",
    "--max_steps", "30", "--eval_freq", "10", "--checkpoint_freq", "10", "--log_freq", "5",
    "--learning_rate", "3e-3", "--eval_max_batches", "4", "--progress", "false",
    "--eval_prompts", "eval_prompts/demo_ifeval.jsonl", "--eval_num_prompts", "4", "--eval_max_new_tokens", "16",
]


def run_trainer(args: list[str], env: dict | None = None, check: bool = True, timeout: int = 300):
    """`python -m trainer ...` in a subprocess, as a user would run it."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "trainer", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """checkpoints/<run>/ of a real 30-step demo run: step-000010/20/30 and final/."""
    out = tmp_path_factory.mktemp("runs")
    run_trainer(["train", *TINY_ARGS, "--output_dir", str(out), "--run_name", "tiny"])
    return out / "tiny"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return SHARED
