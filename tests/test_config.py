"""Config: defaults < YAML < flags, the seed's YAML block, and one-line errors naming the key or flag."""

import pytest

from tests.support import ROOT, run_trainer
from trainer.cli.options import config_parser, given, parse_config
from trainer.core.config import load_saved, read_yaml, resolve
from trainer.core.errors import StepwiseError


def test_precedence_defaults_yaml_flags(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("optim:\n  learning_rate: 0.001\n  mini_batch_size: 4\ndata:\n  context_length: 64\n")
    cfg = parse_config(["--config", str(config), "--mini_batch_size", "2"])
    assert cfg.optim.learning_rate == 0.001  # YAML over default
    assert cfg.optim.mini_batch_size == 2  # flag over YAML
    assert cfg.data.val_fraction == 0.05  # default kept
    assert cfg.config_name == "run"


def test_seed_yaml_loads_as_written():
    cfg = parse_config(["--config", str(ROOT / "configs" / "seed-full-finetune.yaml")])
    assert cfg.optim.num_epochs == 7
    assert cfg.eval.eval_freq == 24 and cfg.checkpoint.checkpoint_freq == 24
    assert cfg.checkpoint.save_total_limit == 5 and cfg.checkpoint.load_best_model_at_end is True
    assert cfg.eval.metric_for_best_model == "val_loss"  # HF's eval_loss
    assert cfg.eval.early_stopping_patience == 3 and cfg.eval.early_stopping_threshold == 0.001


def test_resolved_config_round_trips(tmp_path):
    cfg = parse_config(["--learning_rate", "0.01", "--resume", "--use_tensorboard", "false"])
    saved = tmp_path / "config.yaml"
    saved.write_text(cfg.to_yaml())
    again = load_saved(saved)
    assert again == cfg
    assert again.run.resume is True and again.run.use_tensorboard is False


def test_grad_accum_from_total_batch_tokens():
    cfg = parse_config(["--mini_batch_size", "8", "--context_length", "1024", "--total_batch_size", "65536"])
    assert cfg.grad_accum_steps == 8


@pytest.mark.parametrize("yaml_text, needle", [
    ("training:\n  learning_rat: 0.1\n", "unknown key 'learning_rat'"),
    ("eval_steps: ten\n", "key 'eval_freq' must be int"),
    ("load_best_model_at_end: 3\n", "key 'load_best_model_at_end' must be bool"),
    ("optim: [1, 2\n", "invalid YAML"),
])
def test_bad_yaml_names_the_key(tmp_path, yaml_text, needle):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    with pytest.raises(StepwiseError, match=needle) as err:
        read_yaml(str(config))
    assert str(config) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("argv, flag", [
    (["--total_batch_size", "1000", "--mini_batch_size", "8", "--context_length", "64"], "--total_batch_size"),
    (["--checkpoint_freq", "25", "--eval_freq", "10"], "--checkpoint_freq"),
    (["--metric_for_best_model", "accuracy"], "--metric_for_best_model"),
    (["--val_fraction", "1.5"], "--val_fraction"),
    (["--metric_for_best_model", "if_prompt_strict", "--eval_prompts", "none"], "--eval_prompts"),
    (["--config", "no/such.yaml"], "--config"),
])
def test_impossible_combinations_name_the_flag(argv, flag):
    with pytest.raises(StepwiseError, match=flag):
        parse_config(argv)


def test_checkpoint_not_multiple_of_eval_is_fine_without_best_model():
    cfg = parse_config(["--checkpoint_freq", "25", "--eval_freq", "10", "--load_best_model_at_end", "false"])
    assert cfg.checkpoint.checkpoint_freq == 25


def test_cli_error_is_one_line_and_exit_2(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("training:\n  nonsense: 1\n")
    proc = run_trainer(["train", "--config", str(config)], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {config} (training): unknown key 'nonsense'"]
    assert "Traceback" not in proc.stderr


def test_world_size_enters_the_divisibility_check(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = ["--total_batch_size", "1024", "--mini_batch_size", "4", "--context_length", "256"]
    with pytest.raises(StepwiseError, match="world size"):
        resolve(*given(config_parser("x", "").parse_args(args)))


@pytest.mark.parametrize("argv, flag", [
    (["--learning_rate", "nan"], "--learning_rate"),
    (["--max_grad_norm", "-1"], "--max_grad_norm"),
    (["--weight_decay", "-0.1"], "--weight_decay"),
    (["--min_lr_ratio", "2"], "--min_lr_ratio"),
    (["--eval_max_new_tokens", "0"], "--eval_max_new_tokens"),
    (["--val_fraction", "0"], "--val_fraction 0"),
])
def test_values_that_would_train_wrong_are_refused(argv, flag):
    with pytest.raises(StepwiseError, match=flag):
        parse_config(argv)


def test_a_runs_saved_config_is_a_valid_config_file(tmp_path):
    saved = tmp_path / "config.yaml"
    saved.write_text(parse_config(["--learning_rate", "0.01"]).to_yaml())
    again = parse_config(["--config", str(saved)])
    assert again.optim.learning_rate == 0.01


def test_resume_keeps_the_data_and_model_settings():
    from trainer.core.config import resumed

    saved = parse_config(["--seed", "7", "--max_steps", "100"])
    longer = resumed(saved, {"max_steps": 300, "seed": 7})
    assert longer.optim.max_steps == 300 and longer.optim.seed == 7 and longer.run.resume
    with pytest.raises(StepwiseError, match="--seed: the run was trained with 7"):
        resumed(saved, {"seed": 8})


@pytest.mark.parametrize("argv", [["--max_steps", "abc"], ["--no_such_flag", "1"]])
def test_argparse_mistakes_are_one_line(argv):
    proc = run_trainer(["train", *argv], check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error:")


def test_no_config_is_the_demo_preset_and_a_real_model_is_not():
    demo = parse_config([])
    assert demo.config_name == "demo"
    assert demo == parse_config(["--config", str(ROOT / "configs" / "demo.yaml")])
    assert parse_config(["--max_steps", "10"]).optim.learning_rate == demo.optim.learning_rate
    real = parse_config(["--pretrained_model", "some/model"])
    assert real.config_name == "default" and real.optim.learning_rate == 2e-5
