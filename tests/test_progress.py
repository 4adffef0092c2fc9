"""What long commands print when nobody watches a terminal, and what they no longer print: plain
progress lines at least every interval (train, eval, plan timing; the interval shortened through
STEPWISE_PROGRESS_INTERVAL_S instead of waiting 30 s), which tokens tok/s counts, the checkers'
language-detection noise kept at debug level, and `trainer eval final/` alone still giving a plot."""

from __future__ import annotations

import json
import logging
import re
import shutil
import time

from tests.support import ROOT, run_trainer
from trainer.evals.report import plot_points
from trainer.training.progress import Heartbeat, Reporter, progress_interval

FAST = {"STEPWISE_PROGRESS_INTERVAL_S": "0.05", "OMP_NUM_THREADS": "1"}


# --- the heartbeat --------------------------------------------------------------------------------

def test_heartbeat_speaks_only_after_a_quiet_interval():
    said: list[str] = []
    with Heartbeat(lambda elapsed: f"at {elapsed:.2f}", said.append, interval=0.05):
        time.sleep(0.3)
    assert len(said) >= 3 and all(s.startswith("at ") for s in said)
    spoken = len(said)
    with Heartbeat(lambda elapsed: "quiet?", said.append, interval=0.2) as beat:
        for _ in range(20):  # something else is printed every 0.02 s: no heartbeat needed
            beat.touch()
            time.sleep(0.02)
    assert len(said) == spoken
    time.sleep(0.1)
    assert len(said) == spoken, "the heartbeat thread outlived its block"


def test_interval_from_the_environment(monkeypatch):
    monkeypatch.setenv("STEPWISE_PROGRESS_INTERVAL_S", "0.5")
    assert progress_interval() == 0.5
    for bad in ("soon", "0", "-1"):
        monkeypatch.setenv("STEPWISE_PROGRESS_INTERVAL_S", bad)
        assert progress_interval() == 30.0
    monkeypatch.delenv("STEPWISE_PROGRESS_INTERVAL_S")
    assert progress_interval() == 30.0


def test_reporter_without_a_terminal_prints_status_lines_and_both_token_rates(capsys):
    reporter = Reporter(enabled=True, progress=True, interval=0.05)  # pytest's stdout is no terminal
    assert not reporter.live
    reporter.start(total=10, completed=2)
    reporter.advance(3, 0.3, 2.5, 1e-3)
    time.sleep(0.3)
    reporter.log({"step": 3, "epoch": 0.3, "train_loss": 2.5, "lr": 1e-3, "grad_norm": None,
                  "tokens_per_s": 1234.0, "nonpad_tokens_per_s": 4321.0})
    reporter.close()
    out = capsys.readouterr().out
    beats = [line for line in out.splitlines() if line.startswith("step 3/10 ")]
    assert beats and "epoch 0.30 loss 2.5000" in beats[0] and "elapsed, ETA" in beats[0], out
    assert "grad_norm - 1,234 supervised / 4,321 non-padding tok/s" in out
    time.sleep(0.15)
    assert capsys.readouterr().out == "", "close() stops the heartbeat"


def test_reporter_log_line_names_supervised_tokens_without_the_non_padding_count(capsys):
    reporter = Reporter(enabled=True, progress=False)
    reporter.log({"step": 5, "epoch": 0.5, "train_loss": 1.0, "lr": 1e-4, "grad_norm": 0.5, "tokens_per_s": 10.0})
    assert "grad_norm 0.500 10 supervised tok/s" in capsys.readouterr().out


def test_train_without_a_terminal_prints_a_line_every_interval(tmp_path):
    proc = run_trainer(["train", "--demo_records", "300", "--context_length", "64", "--mini_batch_size", "8",
                        "--max_steps", "6", "--eval_freq", "6", "--checkpoint_freq", "6", "--log_freq", "100",
                        "--eval_prompts", "none", "--use_tensorboard", "false", "--output_dir", str(tmp_path),
                        "--run_name", "beat"], env=FAST)
    beats = re.findall(r"^step (\d+)/6 epoch [\d.]+ loss .* elapsed", proc.stdout, flags=re.M)
    assert beats, proc.stdout
    assert [int(b) for b in beats] == sorted(int(b) for b in beats)


def test_eval_without_a_terminal_prints_plain_progress_lines(trained_checkpoint, tmp_path):
    proc = run_trainer(["eval", str(trained_checkpoint), "--prompts", "eval_prompts/demo_ifeval.jsonl",
                        "--limit", "3", "--max_new_tokens", "4", "--root", str(tmp_path)], env=FAST)
    lines = proc.stderr.splitlines()
    assert "generating with tiny (1/1): 3 prompts" in lines, proc.stderr
    assert any(re.match(r"generating with tiny \(1/1\): \d/3 prompts; \d/3 in all, 0m\d\ds elapsed", line)
               for line in lines), proc.stderr
    assert "━" not in proc.stderr  # no rich bar frames in a file


def test_plan_says_it_will_time_steps_before_it_does(tmp_path):
    proc = run_trainer(["plan", "--config", str(ROOT / "configs" / "demo.yaml"), "--demo_records", "300",
                        "--timing_steps", "1", "--output_dir", str(tmp_path)], env=FAST)
    out = proc.stdout
    announce = out.find("timing 1 training steps of the demo model (after one warm-up step); "
                        "pass --timing_steps 0 to skip")
    assert announce >= 0, out
    assert announce < out.find("measured now over 1 training steps")
    assert re.search(r"^timing: (loading the data and the model|warm-up step|step 1/1), 0m\d\ds elapsed$", out,
                     flags=re.M), out
    skipped = run_trainer(["plan", "--config", str(ROOT / "configs" / "demo.yaml"), "--demo_records", "300",
                           "--timing_steps", "0", "--output_dir", str(tmp_path)])
    assert "timing" not in skipped.stdout.replace("timing_steps", "")


# --- the checkers' logging -------------------------------------------------------------------------

UNDETECTABLE = {"key": "lang", "prompt": "Answer in English only.", "instruction_id_list":
                ["language:response_language", "change_case:english_capital"], "kwargs": [{"language": "en"}, {}]}


def test_score_prints_no_language_detection_errors(tmp_path):
    prompts, responses = tmp_path / "p.jsonl", tmp_path / "r.jsonl"
    prompts.write_text(json.dumps(UNDETECTABLE) + "\n")
    responses.write_text(json.dumps({"prompt": UNDETECTABLE["prompt"], "response": "12345 !!!"}) + "\n")
    proc = run_trainer(["score", "--prompts", str(prompts), "--responses", str(responses)])
    assert "Unable to detect language" not in proc.stderr + proc.stdout
    assert "ERROR" not in proc.stderr, proc.stderr


def test_language_detection_failures_go_to_debug_and_leave_the_root_logger_alone(caplog):
    from trainer.evals.prompts import HeldoutPrompt
    from trainer.evals.scoring import score_response

    root = logging.getLogger()
    level, handlers = root.level, root.handlers[:]
    prompt = HeldoutPrompt(key="lang", prompt=UNDETECTABLE["prompt"],
                           instruction_id_list=UNDETECTABLE["instruction_id_list"], kwargs=UNDETECTABLE["kwargs"])
    with caplog.at_level(logging.DEBUG, logger="if_verifiable"):
        score_response(prompt, "12345 !!!")
    noise = [r for r in caplog.records if "Unable to detect language" in r.getMessage()]
    assert noise and all(r.levelno == logging.DEBUG and r.name == "if_verifiable" for r in noise)
    assert root.level == level and root.handlers == handlers


# --- a plot for final/ alone -----------------------------------------------------------------------

def _entry(checkpoint: str, step: int | None) -> dict:
    return {"checkpoint": checkpoint, "step": step, "val_loss": 1.0, "summary": {"rougeL": 0.5}}


def test_final_is_plotted_unless_its_step_is():
    assert [e["checkpoint"] for e in plot_points([_entry("final", 20)])] == ["final"]
    both = plot_points([_entry("final", 20), _entry("step-000020", 20), _entry("step-000010", 10)])
    assert [e["checkpoint"] for e in both] == ["step-000010", "step-000020"]
    assert plot_points([_entry("somewhere", None)]) == []


def test_eval_of_final_alone_writes_the_plot(eval_root, tmp_path):
    run = shutil.copytree(eval_root / "demo-run", tmp_path / "checkpoints" / "demo-run")
    proc = run_trainer(["eval", str(run / "final"), "--prompts", "eval_prompts/demo_ifeval.jsonl", "--limit", "2",
                        "--max_new_tokens", "4", "--root", str(tmp_path / "checkpoints")],
                       env={"OMP_NUM_THREADS": "1"})
    assert f"plot: {run / 'eval' / 'metrics.png'}" in proc.stdout.replace("\n", ""), proc.stdout
    assert (run / "eval" / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
