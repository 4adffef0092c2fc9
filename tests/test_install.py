"""A non-editable install works from any folder: its configs and held-out prompts ship in the wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """`pip install .` (no deps, no editable) into a fresh target folder."""
    target = tmp_path_factory.mktemp("site")
    # A copy of the source, so the build's own folders (build/, *.egg-info) never land in the checkout.
    source = tmp_path_factory.mktemp("src") / "stepwise"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "checkpoints", "test-artifacts",
                                                                  "__pycache__", "*.egg-info", "build", ".cache"))
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--no-cache-dir", "--target", str(target), str(source)],
                          capture_output=True, text=True, timeout=300, cwd=source)
    assert proc.returncode == 0, proc.stderr
    assert (target / "trainer" / "_data" / "configs" / "demo.yaml").is_file()
    assert (target / "trainer" / "_data" / "eval_prompts" / "demo_ifeval.jsonl").is_file()
    return target


def run_installed(installed: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(installed)}
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_installed_package_is_the_one_that_runs(installed, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(installed)}
    proc = subprocess.run([sys.executable, "-c", "import trainer, sys; print(trainer.__file__)"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, check=True)
    assert proc.stdout.strip().startswith(str(installed))


def test_plan_and_a_two_step_train_from_another_folder(installed, tmp_path):
    small = ["--demo_records", "200", "--context_length", "64", "--mini_batch_size", "4"]
    plan = run_installed(installed, tmp_path, "plan", *small, "--max_steps", "2")
    assert plan.returncode == 0, plan.stderr
    assert "steps per epoch" in plan.stdout and "2 = 0.04 epochs" in plan.stdout, plan.stdout
    # The demo preset (configs/demo.yaml) and its held-out prompts (eval_prompts/) come from the install.
    train = run_installed(installed, tmp_path, "train", *small, "--max_steps", "2", "--eval_freq", "1",
                          "--checkpoint_freq", "2", "--eval_num_prompts", "2", "--eval_max_new_tokens", "4",
                          "--progress", "false", "--run_name", "installed")
    assert train.returncode == 0, train.stderr
    run = tmp_path / "checkpoints" / "installed"
    weights = load_file(run / "step-000002" / "model.safetensors")
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
    assert (run / "step-000002" / "samples.jsonl").read_text().count("\n") == 2
    config = (run / "config.yaml").read_text()
    assert "demo_ifeval.jsonl" in config and str(installed) in config
