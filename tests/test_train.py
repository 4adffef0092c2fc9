"""End to end on CPU: a real tiny run, its files, metrics, best/final, rotation, early stopping,
exact resume, DDP equality and the NaN guard (litgpt tests/test_full.py, trl test_sft_trainer.py)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.support import ROOT, run_trainer
from trainer.core.catalog import list_steps, step_dir_name
from trainer.training.checkpoint import rotate

FAST = ["--demo_records", "300", "--context_length", "96", "--mini_batch_size", "4", "--eval_max_batches", "2",
        "--progress", "false", "--use_tensorboard", "false", "--learning_rate", "3e-3", "--warmup_ratio", "0.1",
        "--eval_prompts", "none"]


def history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "training_metrics.json").read_text())["history"]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {h["step"]: h["train_loss"] for h in history(run_dir) if "train_loss" in h}


def test_run_writes_the_design_layout(tiny_run):
    assert (tiny_run / "config.yaml").is_file()
    assert list((tiny_run / "tensorboard").glob("events.out.tfevents.*"))
    assert list_steps(tiny_run) == [10, 20, 30]
    for step in (10, 20, 30):
        folder = tiny_run / step_dir_name(step)
        for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json", "trainer_state.json", "optimizer.safetensors", "rng.safetensors",
                     "samples.jsonl"):
            assert (folder / name).is_file(), f"{folder}/{name}"
        assert json.loads((folder / "trainer_state.json").read_text())["step"] == step
    assert not list(tiny_run.glob(".tmp-*")), "no temporary folder is left behind"
    assert not list(tiny_run.rglob("*.bin")) and not list(tiny_run.rglob("*.pt")), "nothing pickled"


def test_checkpoints_load_with_transformers_and_keep_the_chat_template(tiny_run):
    for folder in (tiny_run / "step-000010", tiny_run / "final"):
        model = AutoModelForCausalLM.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
        assert text == "### Instruction:\nhi\n\n### Response:\n"
        assert model.config.model_type == "llama"


def test_parameters_changed_and_loss_fell(tiny_run):
    first = load_file(tiny_run / "step-000010" / "model.safetensors")
    last = load_file(tiny_run / "step-000030" / "model.safetensors")
    assert any(not torch.equal(first[k], last[k]) for k in first)
    hist = history(tiny_run)
    losses = [h["train_loss"] for h in hist if "train_loss" in h]
    assert losses[-1] < losses[0]
    vals = [h["val_loss"] for h in hist if "val_loss" in h]
    assert len(vals) == 3 and vals[-1] < vals[0]


def test_metrics_file_has_history_best_and_state(tiny_run):
    metrics = json.loads((tiny_run / "training_metrics.json").read_text())
    entry = next(h for h in metrics["history"] if h["step"] == 10)
    for key in ("step", "epoch", "train_loss", "val_loss", "val_ppl", "lr", "grad_norm", "tokens", "tokens_per_s", "trend"):
        assert key in entry, key
    assert "if_prompt_strict" in entry, "held-out scores are logged at checkpoints"
    assert metrics["best"]["checkpoint"] == step_dir_name(metrics["best"]["step"])
    assert metrics["stop_reason"].startswith("finished")
    assert metrics["recommendation"] and metrics["trend"] in ("improving", "plateau", "overfitting")
    assert set(metrics["early_stopping"]) >= {"patience", "threshold", "bad_evals", "stopped"}


def test_final_is_the_best_checkpoint(tiny_run):
    metrics = json.loads((tiny_run / "training_metrics.json").read_text())
    vals = {h["step"]: h["val_loss"] for h in metrics["history"] if "val_loss" in h}
    assert metrics["best"]["step"] == min(vals, key=vals.get)
    best = load_file(tiny_run / metrics["best"]["checkpoint"] / "model.safetensors")
    final = load_file(tiny_run / "final" / "model.safetensors")
    assert all(torch.equal(best[k], final[k]) for k in best)
    assert not (tiny_run / "final" / "optimizer.safetensors").exists()


def test_samples_are_scored_at_every_checkpoint(tiny_run):
    rows = [json.loads(line) for line in (tiny_run / "step-000030" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    assert {"key", "prompt", "response", "strict", "loose", "finished"} <= set(rows[0])


@pytest.mark.parametrize("limit, kept", [(1, [20, 50]), (2, [20, 50]), (3, [20, 40, 50])])
def test_rotation_never_deletes_the_best(tmp_path, limit, kept):
    for step in (10, 20, 30, 40, 50):
        (tmp_path / step_dir_name(step)).mkdir()
    rotate(tmp_path, limit, best_step=20)
    assert list_steps(tmp_path) == kept


def test_early_stopping_stops_and_says_why(tmp_path):
    # A threshold no evaluation can beat: patience 2 runs out at the third evaluation.
    run_trainer(["train", *FAST, "--max_steps", "40", "--eval_freq", "5", "--checkpoint_freq", "5",
                 "--early_stopping_patience", "2", "--early_stopping_threshold", "100",
                 "--output_dir", str(tmp_path), "--run_name", "es"])
    metrics = json.loads((tmp_path / "es" / "training_metrics.json").read_text())
    assert metrics["stop_reason"].startswith("early stopping at step 15")
    assert metrics["early_stopping"]["stopped"] is True
    assert list_steps(tmp_path / "es")[-1] == 15
    vals = {h["step"]: h["val_loss"] for h in metrics["history"] if "val_loss" in h}
    assert metrics["best"]["step"] == min(vals, key=vals.get) and (tmp_path / "es" / "final").is_dir()


def test_resume_reproduces_the_uninterrupted_losses(tmp_path):
    args = [*FAST, "--max_steps", "24", "--eval_freq", "4", "--checkpoint_freq", "4", "--log_freq", "1",
            "--output_dir", str(tmp_path)]
    run_trainer(["train", *args, "--run_name", "straight"])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "train", *args, "--run_name", "cut"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "cut" / "step-000004").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    cut = json.loads((tmp_path / "cut" / "training_metrics.json").read_text())
    assert cut["stop_reason"].startswith("interrupted (SIGTERM)"), out
    stopped_at = list_steps(tmp_path / "cut")[-1]
    assert stopped_at < 24
    run_trainer(["train", *args, "--run_name", "cut", "--resume"])
    straight, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "cut")
    assert sorted(resumed) == list(range(1, 25))
    assert resumed == straight, "bitwise equal per-step losses"


def test_resume_without_checkpoint_is_one_line(tmp_path):
    proc = run_trainer(["train", *FAST, "--output_dir", str(tmp_path), "--run_name", "empty", "--resume"], check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--resume" in proc.stderr


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    args = [*FAST, "--max_steps", "6", "--eval_freq", "3", "--checkpoint_freq", "3", "--log_freq", "1",
            "--mini_batch_size", "2", "--total_batch_size", str(2 * 96 * 2), "--output_dir", str(tmp_path)]
    run_trainer(["train", *args, "--run_name", "one"])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "trainer", "train", *args, "--run_name", "two"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    one, two = history(tmp_path / "one"), history(tmp_path / "two")
    assert [h["step"] for h in one] == [h["step"] for h in two]
    for a, b in zip(one, two):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-5
        if "val_loss" in a:
            assert abs(a["val_loss"] - b["val_loss"]) < 1e-5
    assert one[-1]["tokens"] == two[-1]["tokens"]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    proc = run_trainer(["train", *FAST, "--max_steps", "20", "--eval_freq", "1", "--checkpoint_freq", "1",
                        "--learning_rate", "1e12", "--max_grad_norm", "0", "--warmup_ratio", "0",
                        "--output_dir", str(tmp_path), "--run_name", "nan"], check=False)
    assert proc.returncode == 3
    assert "non-finite loss" in proc.stderr
    steps = list_steps(tmp_path / "nan")
    assert steps, "the checkpoints before the blow-up are kept"
    AutoModelForCausalLM.from_pretrained(tmp_path / "nan" / step_dir_name(steps[-1]))


def test_best_model_by_a_heldout_metric(tmp_path):
    """--metric_for_best_model if_inst_loose: best, early stopping and final/ follow the held-out score."""
    run_trainer(["train", *FAST, "--max_steps", "12", "--eval_freq", "4", "--checkpoint_freq", "4",
                 "--eval_prompts", "eval_prompts/demo_ifeval.jsonl", "--eval_num_prompts", "4",
                 "--eval_max_new_tokens", "8", "--metric_for_best_model", "if_inst_loose",
                 "--early_stopping_patience", "5", "--dtype", "bf16",
                 "--output_dir", str(tmp_path), "--run_name", "ifbest"])
    metrics = json.loads((tmp_path / "ifbest" / "training_metrics.json").read_text())
    scores = {h["step"]: h["if_inst_loose"] for h in metrics["history"] if "if_inst_loose" in h}
    assert sorted(scores) == [4, 8, 12]
    best = metrics["best"]
    assert best["metric"] == "if_inst_loose" and best["value"] == max(scores.values())
    assert best["step"] == min(s for s, v in scores.items() if v == best["value"]), "ties keep the earlier one"
    assert metrics["early_stopping"]["metric"] == "if_inst_loose"
    final_state = json.loads((tmp_path / "ifbest" / "final" / "trainer_state.json").read_text())
    assert final_state["step"] == best["step"]


def test_fine_tune_from_a_stepwise_checkpoint_on_a_file(tiny_run, tmp_path, shared_data):
    """--pretrained_model takes one of this project's checkpoints; --dataset a real Alpaca file."""
    run_trainer(["train", *FAST, "--pretrained_model", str(tiny_run / "final"),
                 "--dataset", str(shared_data / "alpaca" / "alpaca_en_demo.json"), "--max_steps", "4",
                 "--eval_freq", "2", "--checkpoint_freq", "2", "--output_dir", str(tmp_path), "--run_name", "ft"])
    start = load_file(tiny_run / "final" / "model.safetensors")
    tuned = load_file(tmp_path / "ft" / "step-000004" / "model.safetensors")
    assert start.keys() == tuned.keys() and any(not torch.equal(start[k], tuned[k]) for k in start)
    assert (tmp_path / "ft" / "final" / "chat_template.jinja").read_text() == \
        (tiny_run / "final" / "chat_template.jinja").read_text()


@pytest.mark.parametrize("flag, value, needle", [
    ("--output_dir", "FILE", "is a file"),
    ("--eval_prompts", "no/such.jsonl", "--eval_prompts no/such.jsonl: no such file"),
    ("--pretrained_model", "/no/such/model", "--pretrained_model /no/such/model: no such folder"),
])
def test_path_mistakes_fail_fast_in_one_line(tmp_path, flag, value, needle):
    if value == "FILE":
        value = str(tmp_path / "a-file")
        Path(value).write_text("x")
    proc = run_trainer(["train", *FAST, flag, value], check=False)
    assert proc.returncode == 2 and needle in proc.stderr and proc.stderr.count("\n") == 1


def test_resume_takes_the_runs_config_and_a_longer_max_steps(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "again"
    shutil.copytree(tiny_run, run)
    run_trainer(["train", "--output_dir", str(tmp_path), "--run_name", "again", "--resume", "--max_steps", "40",
                 "--eval_prompts", "none"])
    assert list_steps(run)[-1] == 40
    metrics = json.loads((run / "training_metrics.json").read_text())
    assert metrics["history"][-1]["step"] == 40 and metrics["stop_reason"] == "finished: reached 40 steps"
    proc = run_trainer(["train", "--output_dir", str(tmp_path), "--run_name", "again", "--resume", "--seed", "1"],
                       check=False)
    assert proc.returncode == 2 and "--seed: the run was trained with 42" in proc.stderr
