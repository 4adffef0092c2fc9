"""Faults a long run meets: non-finite steps, a full disk, an unwritable output folder, damaged run
files, changed flags on --resume, SIGTERM between log steps, and kill -9 at random moments."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.support import ROOT, run_trainer
from trainer.core.catalog import list_steps, step_dir_name
from trainer.training.checkpoint import weights_finite

FAST = ["--demo_records", "300", "--context_length", "64", "--mini_batch_size", "4", "--eval_max_batches", "2",
        "--progress", "false", "--use_tensorboard", "false", "--learning_rate", "3e-3", "--warmup_ratio", "0.1",
        "--eval_prompts", "none"]


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "training_metrics.json").read_text())


def tree_hash(folder: Path) -> str:
    """Names and bytes of every file under folder: equal before and after means nothing changed."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def one_line_error(proc: subprocess.CompletedProcess, code: int, needle: str) -> None:
    assert proc.returncode == code, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


# --- 1. numerical faults -------------------------------------------------------------------------

def test_non_finite_gradients_are_never_applied_nor_saved_and_resume_continues(tmp_path):
    """A finite loss with a NaN gradient norm (lr 1e6 blows the weights up into NaN activations)."""
    args = [*FAST, "--max_steps", "10", "--learning_rate", "1e6", "--warmup_ratio", "0", "--eval_freq", "1",
            "--checkpoint_freq", "1", "--log_freq", "1", "--output_dir", str(tmp_path), "--run_name", "nan"]
    proc = run_trainer(["train", *args], check=False)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "update skipped" in proc.stderr and "Traceback" not in proc.stderr
    run = tmp_path / "nan"
    m = metrics(run)
    assert m["stop_reason"].startswith("non-finite") and "intact and finite" in m["stop_reason"]
    steps = list_steps(run)
    assert steps and steps[-1] < 10
    for step in steps:  # no checkpoint with a NaN weight is ever written
        assert weights_finite(run / step_dir_name(step)), step
    assert m["best"] and m["best"]["value"] == m["best"]["value"], "a NaN is never the best"
    # --resume continues from the last (finite) checkpoint and tells the truth again: these weights
    # are finite but already blown up, so the run stops again, still writing nothing non-finite.
    again = run_trainer(["train", *args, "--resume"], check=False)
    assert again.returncode == 3 and f"resumed from {run / step_dir_name(steps[-1])}" in again.stdout
    assert "Traceback" not in again.stderr
    assert all(weights_finite(run / step_dir_name(s)) for s in list_steps(run))


def test_a_new_learning_rate_applies_on_resume_and_is_recorded(tmp_path):
    args = [*FAST, "--max_steps", "4", "--eval_freq", "4", "--checkpoint_freq", "4", "--log_freq", "1",
            "--warmup_ratio", "0", "--output_dir", str(tmp_path), "--run_name", "r"]
    run_trainer(["train", *args])
    proc = run_trainer(["train", *args, "--resume", "--max_steps", "8", "--learning_rate", "1e-3"])
    assert "changed on resume: learning_rate 0.003 -> 0.001" in proc.stdout
    m = metrics(tmp_path / "r")
    assert m["data"]["resumes"] == [{"step": 4, "changed": {"learning_rate": [0.003, 0.001]}}]
    lrs = {h["step"]: h["lr"] for h in m["history"]}
    # The 8-step cosine (warmup 0, floor 0.1 x peak) at step 5, from the new peak 1e-3.
    assert lrs[5] == pytest.approx(1e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * 5 / 8))), rel=1e-9)
    assert "learning_rate: 0.001" in (tmp_path / "r" / "config.yaml").read_text()


def test_resume_skips_a_checkpoint_with_nan_weights(tmp_path):
    args = [*FAST, "--max_steps", "4", "--eval_freq", "2", "--checkpoint_freq", "2", "--output_dir", str(tmp_path),
            "--run_name", "r"]
    run_trainer(["train", *args])
    run = tmp_path / "r"
    weights = run / "step-000004" / "model.safetensors"  # as an older Stepwise could have written it
    tensors = load_file(weights)
    tensors = {k: torch.full_like(v, float("nan")) for k, v in tensors.items()}
    from safetensors.torch import save_file

    save_file(tensors, weights, metadata={"format": "pt"})
    proc = run_trainer(["train", *args, "--resume", "--max_steps", "6"])
    assert f"skipping {run / 'step-000004'}: its weights are not finite" in proc.stdout
    assert f"resumed from {run / 'step-000002'}" in proc.stdout
    assert weights_finite(run / "step-000004") and weights_finite(run / "step-000006")


# --- 2. the file system --------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 60 MB tmpfs: room for one checkpoint of the demo model (40 MB), not two."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): the disk-full case is not exercised")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_during_a_checkpoint_is_one_line_and_resumable(small_disk):
    args = [*FAST, "--max_steps", "4", "--eval_freq", "2", "--checkpoint_freq", "2", "--log_freq", "1",
            "--output_dir", str(small_disk), "--run_name", "full"]
    proc = run_trainer(["train", *args], check=False)
    run = small_disk / "full"
    one_line_error(proc, 2, f"{run / 'step-000004'}: could not write the checkpoint")
    assert "free space and --resume" in proc.stderr
    assert not list(run.glob(".tmp-*")), "the temporary folder is removed"
    assert list_steps(run) == [2] and weights_finite(run / "step-000002")
    m = metrics(run)  # intact: the last state written before the failed checkpoint
    assert m["history"][-1]["step"] == 4 and m["best"]["step"] == 2
    before = tree_hash(run / "step-000002")
    subprocess.run(["mount", "-o", "remount,size=200m", str(small_disk)], check=True)
    run_trainer(["train", *args, "--resume"])
    assert list_steps(run) == [2, 4] and tree_hash(run / "step-000002") == before
    assert [h["step"] for h in metrics(run)["history"] if "train_loss" in h] == [1, 2, 3, 4]


def test_an_unwritable_output_dir_is_found_before_anything_loads(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        started = time.perf_counter()
        proc = run_trainer(["train", *FAST, "--demo_records", "30000", "--output_dir", str(ro / "runs")], check=False)
        one_line_error(proc, 2, f"--output_dir {ro / 'runs'}: cannot write in {ro}")
        assert "Read-only file system" in proc.stderr
        assert time.perf_counter() - started < 60, "before 30,000 records are generated and a model built"
        assert "train " not in proc.stdout  # the data-count line: nothing was loaded
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


def test_leftover_temp_folders_are_cleaned_and_a_cut_config_is_one_line(tmp_path):
    args = [*FAST, "--max_steps", "2", "--eval_freq", "2", "--checkpoint_freq", "2", "--output_dir", str(tmp_path),
            "--run_name", "r"]
    run_trainer(["train", *args])
    run = tmp_path / "r"
    (run / ".tmp-step-000004").mkdir()
    (run / ".tmp-step-000004" / "model.safetensors").write_bytes(b"half")
    (run / ".training_metrics.json.abc.tmp").write_text("{")
    proc = run_trainer(["train", *args, "--resume", "--max_steps", "4"])
    assert "removed" in proc.stdout and not list(run.glob(".tmp-*")) and not list(run.glob(".*.tmp"))
    config = run / "config.yaml"
    config.write_text(config.read_text()[:200])
    before = tree_hash(run)
    proc = run_trainer(["train", *args, "--resume", "--max_steps", "6"], check=False)
    one_line_error(proc, 2, f"{config}")
    assert tree_hash(run) == before, "nothing changed"


# --- 4. resume tells the truth -------------------------------------------------------------------

def test_resume_validates_flags_against_the_runs_own_config(tmp_path):
    """--eval_freq 3 divides this run's checkpoint_freq 6 (the demo preset's 500 it does not)."""
    args = [*FAST, "--max_steps", "6", "--eval_freq", "6", "--checkpoint_freq", "6", "--output_dir", str(tmp_path),
            "--run_name", "r"]
    run_trainer(["train", *args])
    run_trainer(["train", "--output_dir", str(tmp_path), "--run_name", "r", "--resume", "--eval_freq", "3",
                 "--max_steps", "12"])
    assert [h["step"] for h in metrics(tmp_path / "r")["history"] if "val_loss" in h] == [6, 9, 12]


def _popen(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "trainer", "train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _comparable(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "tokens_per_s"} for h in history]


def test_sigterm_between_log_steps_resumes_to_the_same_history(tmp_path):
    args = [*FAST, "--max_steps", "16", "--eval_freq", "8", "--checkpoint_freq", "8", "--log_freq", "4",
            "--output_dir", str(tmp_path)]
    run_trainer(["train", *args, "--run_name", "straight"])
    proc = _popen([*args, "--run_name", "cut"])
    for line in proc.stdout:  # the first log line is step 4: stop a step or two later, between log steps
        if line.startswith("step 4 "):
            proc.send_signal(signal.SIGTERM)
            break
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    stopped = metrics(tmp_path / "cut")["stop_reason"]
    assert stopped.startswith("interrupted (SIGTERM)"), stopped
    run_trainer(["train", *args, "--run_name", "cut", "--resume"])
    assert _comparable(metrics(tmp_path / "cut")["history"]) == _comparable(metrics(tmp_path / "straight")["history"])


# --- 6. kill -9 at random moments ----------------------------------------------------------------

def _kill_when(proc: subprocess.Popen, run: Path, rng: random.Random, mid_write: bool) -> None:
    """SIGKILL while a checkpoint folder is being written, or at a seeded random moment of training."""
    deadline = time.time() + 120
    if mid_write:
        while proc.poll() is None and time.time() < deadline and not list(run.glob(".tmp-step-*")):
            time.sleep(0.002)
    else:
        while proc.poll() is None and time.time() < deadline and not (run / "training_metrics.json").exists():
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.5))
    proc.kill()
    proc.wait(timeout=60)


def test_kill_9_at_random_moments_resumes_bitwise_equal(tmp_path):
    args = [*FAST, "--max_steps", "12", "--eval_freq", "3", "--checkpoint_freq", "3", "--log_freq", "1",
            "--output_dir", str(tmp_path)]
    run_trainer(["train", *args, "--run_name", "straight"])
    run = tmp_path / "cut"
    rng = random.Random(20261201)
    kills = 0
    for mid_write in (True, False, True):
        proc = _popen([*args, "--run_name", "cut", *(["--resume"] if list_steps(run) else [])])
        _kill_when(proc, run, rng, mid_write)
        kills += proc.returncode == -signal.SIGKILL
        for step in list_steps(run):  # every listed checkpoint is whole and loads
            model = AutoModelForCausalLM.from_pretrained(run / step_dir_name(step))
            assert all(torch.isfinite(p).all() for p in model.parameters())
    assert kills >= 2, "the kills landed while the run was still training"
    run_trainer(["train", *args, "--run_name", "cut", *(["--resume"] if list_steps(run) else [])])
    losses = {h["step"]: h["train_loss"] for h in metrics(run)["history"] if "train_loss" in h}
    straight = {h["step"]: h["train_loss"] for h in metrics(tmp_path / "straight")["history"] if "train_loss" in h}
    assert sorted(losses) == list(range(1, 13)) and losses == straight, "bitwise equal per-step losses"
