"""`trainer eval` and heldout_samples on a real run folder of tiny checkpoints and real prompt files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support import ROOT, SHARED, one_thread, python_env
from trainer.cli import main as cli_main
from trainer.core.config import load_saved
from trainer.evals.heldout import heldout_samples
from trainer.evals.prompts import load_prompts
from trainer.inference.generate import GenerationSettings
from trainer.inference.loading import load_model
from trainer.training.data import load_train_val

IFEVAL = SHARED / "ifeval" / "input_data.jsonl"


def prompt_lines(leaked: str) -> list[dict]:
    return [
        {"key": "lower", "prompt": "Name a fruit. Answer in lowercase letters only.",
         "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}], "category": "case"},
        {"key": "comma", "prompt": "Name a colour without using any commas.",
         "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
        {"key": "both", "prompt": "Say hello in at most 5 words, no commas.",
         "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
         "kwargs": [{}, {"relation": "less than", "num_words": 6}], "reference": "Hello there, friend."},
        {"key": "ref", "prompt": "Capital of France?", "reference": "Paris."},
        {"prompt": "What is 2 plus 3?", "reference": "5"},
        {"key": "leak", "prompt": leaked, "reference": "anything"},
    ]


@pytest.fixture(scope="module")
def tree(eval_root, trained_checkpoint, tmp_path_factory):
    """conftest's eval_root (demo-run/ with step-000010, step-000020 and final/ = step 20), and in a
    folder of this module's a prompt file with one prompt copied from that run's training split."""
    run = eval_root / "demo-run"
    cfg = load_saved(run / "config.yaml")
    train, _, _ = load_train_val("demo", None, cfg.data.val_fraction, cfg.optim.seed, False, cfg.data.demo_records)
    base = tmp_path_factory.mktemp("eval-tests")
    prompts = base / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in prompt_lines(train[0]["messages"][0]["content"])))
    with one_thread():
        yield {"root": eval_root, "run": run, "prompts": prompts, "trained": trained_checkpoint, "base": base}


def run_eval(args: list[str]) -> subprocess.CompletedProcess:
    # One torch thread: on two cores shared with other work, two spinning threads are several times slower.
    return subprocess.run([sys.executable, "-m", "trainer", "eval", *args], cwd=ROOT,
                          env=python_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)


def files_under(*folders: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for f in folders for p in f.rglob("*") if p.is_file()}


def test_eval_cli_on_a_run_table_json_plot_then_cache(tree):
    run, prompts = tree["run"], tree["prompts"]
    args = [str(run), "--prompts", str(prompts), "--max_new_tokens", "8", "--root", str(tree["root"])]
    first = run_eval(args)
    assert first.returncode == 0, first.stderr
    rows = [line for line in first.stdout.splitlines() if "demo-run" in line and "│" in line]
    assert [r.split("│")[2].strip() for r in rows] == ["step-000010", "step-000020"]  # final/ is step 20: once
    assert "2.5000" in rows[0] and "2.2500" in rows[1] and all("new" in r for r in rows)
    assert "1 of 6 held-out prompt(s)" in first.stderr and "leak" in first.stderr  # the copied prompt

    results = sorted((run / "eval").glob("step-*.json"))
    assert [p.name.split("-")[1] for p in results] == ["000010", "000020"]
    data = [json.loads(p.read_text()) for p in results]
    for d, step in zip(data, (10, 20)):
        assert d["step"] == step and d["run"] == "demo-run" and len(d["results"]) == 6
        assert d["summary"]["n"] == 6 and set(d["summary"]) >= {"if_prompt_strict", "if_inst_loose", "rougeL",
                                                                 "mean_length", "eos_rate"}
        assert all({"finished", "new_tokens", "response", "strict", "loose"} <= set(r) for r in d["results"])
        assert d["results"][3]["rougeL"] is not None and d["results"][3]["prompt_strict"] is None
    assert [r["response"] for r in data[0]["results"]] != [r["response"] for r in data[1]["results"]]
    assert (run / "eval" / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    before = files_under(run / "eval")
    second = run_eval(args)
    assert second.returncode == 0, second.stderr
    assert f"cached: step-000010 ({results[0]})" in second.stdout
    assert f"cached: step-000020 ({results[1]})" in second.stdout
    assert "wrote" not in second.stdout
    after = files_under(run / "eval")
    assert {k: v for k, v in after.items() if k.endswith(".json")} == \
        {k: v for k, v in before.items() if k.endswith(".json")}  # read, not rewritten


def test_a_demo_run_notes_shared_template_wording_and_warns_only_on_copies(tree, capsys):
    """The demo's held-out prompts share its templates' wording: near-duplicates alone are one plain note
    in `trainer eval` (as in training); the exact copy in the module's prompt file stays a warning."""
    run = tree["run"]
    cfg = load_saved(run / "config.yaml")
    train, _, _ = load_train_val("demo", None, cfg.data.val_fraction, cfg.optim.seed, False, cfg.data.demo_records)
    near = train[0]["messages"][0]["content"] + " Please."  # the same wording, not the same prompt
    prompts = tree["base"] / "near.jsonl"
    prompts.write_text(json.dumps({"key": "near", "prompt": near, "reference": "anything"}) + "\n")
    assert cli_main(["eval", str(run / "step-000010"), "--prompts", str(prompts), "--max_new_tokens", "2",
                     "--root", str(tree["root"])]) == 0
    err = capsys.readouterr().err
    assert "note: 1 of 1 held-out prompts share template wording" in err and "warning" not in err
    assert cli_main(["eval", str(run / "step-000010"), "--prompts", str(tree["prompts"]), "--limit", "6",
                     "--max_new_tokens", "2", "--root", str(tree["root"])]) == 0
    assert "warning: 1 of 6 held-out prompt(s)" in capsys.readouterr().err


def test_settings_and_new_weights_are_new_cache_entries(tree, capsys):
    run, prompts = tree["run"], tree["prompts"]
    args = ["eval", str(run / "step-000010"), "--prompts", str(prompts), "--limit", "2", "--root", str(tree["root"])]
    assert cli_main(args + ["--max_new_tokens", "3"]) == 0
    assert "cached" not in capsys.readouterr().out
    assert cli_main(args + ["--max_new_tokens", "3"]) == 0
    assert "cached: step-000010" in capsys.readouterr().out
    assert cli_main(args + ["--max_new_tokens", "4"]) == 0  # other settings: generated anew
    assert "cached" not in capsys.readouterr().out
    weights = run / "step-000010" / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # as if the checkpoint were rewritten
    assert cli_main(args + ["--max_new_tokens", "3"]) == 0
    assert "cached" not in capsys.readouterr().out


def test_no_checkpoint_means_the_newest_run(tree, capsys):
    assert cli_main(["eval", "--prompts", str(tree["prompts"]), "--limit", "1", "--max_new_tokens", "2",
                     "--root", str(tree["root"])]) == 0
    out = capsys.readouterr().out
    assert "step-000010" in out and "step-000020" in out


def test_ifeval_input_file_runs_unchanged(tree, capsys):
    root = tree["base"] / "hf-root"
    assert cli_main(["eval", str(tree["trained"]), "--prompts", str(IFEVAL), "--limit", "3", "--max_new_tokens", "4",
                     "--root", str(root)]) == 0
    (result,) = (root / "eval").glob("*.json")  # a folder outside any run reports under --root
    data = json.loads(result.read_text())
    first = json.loads(IFEVAL.read_text().splitlines()[0])
    assert data["step"] is None and len(data["results"]) == 3
    assert data["results"][0]["key"] == str(first["key"])
    assert data["results"][0]["instruction_id_list"] == first["instruction_id_list"]
    assert "input_data.jsonl: 3 prompts" in capsys.readouterr().out


def _broken(tree, name: str, drop: tuple[str, ...]) -> Path:
    folder = tree["base"] / "broken" / name
    if not folder.exists():
        shutil.copytree(tree["trained"], folder)
        for f in drop:
            (folder / f).unlink()
    return folder


@pytest.mark.parametrize("case, expect", [
    ("no_weights", "no model weights"),
    ("no_tokenizer", "no tokenizer files"),
    ("missing", "no such checkpoint or run folder"),
    ("no_prompts", "prompt file not found"),
    ("bad_prompts", "bad.jsonl:2: invalid JSON"),
    ("limit", "--limit must be positive"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tree, capsys, case, expect):
    run, prompts = tree["run"], tree["prompts"]
    bad = tree["base"] / "bad.jsonl"
    bad.write_text(prompts.read_text().splitlines()[0] + "\n{not json\n")
    ckpt, prompt_file, extra = str(run / "step-000010"), str(prompts), []
    if case == "no_weights":
        ckpt = str(_broken(tree, case, ("model.safetensors",)))
    elif case == "no_tokenizer":
        ckpt = str(_broken(tree, case, ("tokenizer.json", "tokenizer_config.json")))
    elif case == "missing":
        ckpt = str(tree["base"] / "nowhere" / "step-000010")
    elif case == "no_prompts":
        prompt_file = str(tree["base"] / "nope.jsonl")
    elif case == "bad_prompts":
        prompt_file = str(bad)
    elif case == "limit":
        extra = ["--limit", "0"]
    before = files_under(tree["base"], tree["root"])
    code = cli_main(["eval", ckpt, "--prompts", prompt_file, "--root", str(tree["root"]), *extra])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0]
    if case in ("no_weights", "no_tokenizer", "missing"):
        assert ckpt in lines[0]
    assert files_under(tree["base"], tree["root"]) == before


@pytest.mark.parametrize("device, expect", [
    ("bogus", "--device bogus: not a device"),
    ("cuda", "--device cuda: no CUDA device on this machine"),
    ("cuda:99", "--device cuda:99: "),
])
def test_unusable_device_is_one_line_before_anything_is_written(tree, device, expect):
    """A device torch does not know, or one this machine lacks, stops before the contamination check
    (which writes <run>/eval/contamination-*.json) and before any model loads."""
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run = tree["base"] / f"device-{device.replace(':', '-')}" / "demo-run"
    if not run.exists():  # a run of its own: no cached contamination file to hide a write
        shutil.copytree(tree["run"], run, ignore=shutil.ignore_patterns("eval"))
    before = files_under(run.parent)
    proc = run_eval([str(run), "--prompts", str(tree["prompts"]), "--device", device])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {expect}"), proc.stderr
    assert proc.stdout == ""
    assert files_under(run.parent) == before and not (run / "eval").exists()


def test_a_run_with_a_broken_checkpoint_fails_before_generating(tree, capsys):
    run = tree["base"] / "checkpoints-broken" / "r"
    shutil.copytree(tree["run"] / "step-000010", run / "step-000010")
    shutil.copytree(tree["run"] / "step-000010", run / "step-000020")
    (run / "step-000020" / "tokenizer.json").unlink()
    (run / "step-000020" / "tokenizer_config.json").unlink()
    assert cli_main(["eval", str(run), "--prompts", str(tree["prompts"])]) == 2
    assert "step-000020: no tokenizer files" in capsys.readouterr().err
    assert not (run / "eval").exists()


def test_heldout_samples_rows_and_summary(tree):
    loaded = load_model(tree["run"] / "step-000010", device="cpu")
    prompts = load_prompts(tree["prompts"])
    rows, summary = heldout_samples(loaded.model, loaded.tokenizer, prompts, GenerationSettings(max_new_tokens=6),
                                    batch_size=4)
    assert [r["key"] for r in rows] == [p.key for p in prompts]
    assert all(0 < r["new_tokens"] <= 6 and isinstance(r["finished"], bool) for r in rows)
    assert summary["n"] == 6
    assert summary["eos_rate"] == sum(r["finished"] for r in rows) / 6
    assert rows[0]["strict"] in ([True], [False]) and len(rows[2]["strict"]) == 2
