"""The epoch planner: the seed's arithmetic from the CLI, and a timed table for the demo config."""

import json
import random

from tests.support import ROOT, run_trainer
from trainer.cli.options import parse_config
from trainer.training.plan import count


def test_seed_arithmetic():
    cfg = parse_config(["--mini_batch_size", "8", "--context_length", "1024", "--total_batch_size", "65536",
                        "--max_steps", "2000"])
    plan = count(cfg, 49401, 2601)
    assert plan.grad_accum_steps == 8 and plan.examples_per_step == 64
    assert plan.steps_per_epoch == 772
    assert round(plan.epochs, 1) == 2.6


def test_plan_cli_on_a_52002_record_file(tmp_path):
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    rng = random.Random(0)
    data = tmp_path / "seed.jsonl"
    data.write_text("".join(json.dumps({"instruction": "Say " + " ".join(rng.choices(words, k=4)), "input": "",
                                        "output": " ".join(rng.choices(words, k=12))}) + "\n" for _ in range(52002)))
    proc = run_trainer(["plan", "--dataset", str(data), "--mini_batch_size", "8", "--context_length", "1024",
                        "--total_batch_size", "65536", "--max_steps", "2000", "--timing_steps", "0",
                        "--output_dir", str(tmp_path / "runs")])
    out = proc.stdout
    assert "49,401 / 2,601" in out
    assert "8 step(s) x 1 process(es)" in out and "64 examples a step" in out
    assert "772" in out and "2,000 = 2.59 epochs" in out
    assert "tokens per epoch" in out and "truncated at context_length" in out


def test_plan_times_the_demo_config_for_real(tmp_path):
    proc = run_trainer(["plan", "--config", str(ROOT / "configs" / "demo.yaml"), "--demo_records", "400",
                        "--timing_steps", "2", "--output_dir", str(tmp_path)])
    assert "measured now over 2 training steps" in proc.stdout
    for epochs in ("3", "4", "5"):
        assert f"│ {epochs} " in proc.stdout.replace("  ", " ") or f" {epochs} │" in proc.stdout


def test_plan_reuses_a_recorded_speed(tiny_run):
    from tests.support import TINY_ARGS

    proc = run_trainer(["plan", *TINY_ARGS, "--output_dir", str(tiny_run.parent)])
    assert "recorded by run tiny" in proc.stdout


def test_gpu_config_loads_and_validates_offline():
    cfg = parse_config(["--config", str(ROOT / "configs" / "qwen-alpaca-gpt4.yaml")])
    assert cfg.model.pretrained_model == "Qwen/Qwen2.5-0.5B"
    assert (cfg.optim.mini_batch_size, cfg.data.context_length, cfg.optim.total_batch_size) == (8, 1024, 65536)
    assert cfg.grad_accum_steps == 8 and cfg.optim.max_steps == 2300 and cfg.optim.learning_rate == 2e-5
    assert cfg.eval.eval_freq == cfg.checkpoint.checkpoint_freq == 100


def test_demo_config_is_what_make_train_runs():
    makefile = (ROOT / "Makefile").read_text()
    assert "CONFIG  ?= configs/demo.yaml" in makefile
    cfg = parse_config(["--config", str(ROOT / "configs" / "demo.yaml")])
    assert cfg.model.pretrained_model == "demo" and cfg.data.dataset == "demo"
    assert cfg.optim.max_steps // cfg.checkpoint.checkpoint_freq >= 3
