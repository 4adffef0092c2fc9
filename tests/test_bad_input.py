"""Bad bytes and bad weights: each is one line naming the file, line or flag, exit 2, nothing written.

Every case runs the command as a user would (`python -m trainer train|eval` in a subprocess) and
checks the exit code, the one `error:` line, that no traceback was printed, and that nothing that
existed changed: the output folder (with an earlier run in it) and the input are hashed before and
after. load_model, which the REPL's /load and the web app's columns use, is tested directly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.core.errors import StepwiseError
from trainer.inference.generate import GenerationSettings
from trainer.inference.hub import hub_unreachable
from trainer.inference.loading import load_model

ROOT = Path(__file__).resolve().parents[1]
# Fails before training starts, whatever the case; if it did not, two steps of a tiny run are seconds.
TINY = ["--demo_records", "60", "--context_length", "64", "--max_steps", "2", "--progress", "false",
        "--eval_prompts", "none", "--use_tensorboard", "false"]
# The hub client's retry lines: what an unreachable hub printed for most of a minute.
HUB_NOISE = ("Retrying in", "thrown while requesting")


def trainer(args: list[str], env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    for name, value in (env or {}).items():
        if value is None:
            full.pop(name, None)
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=timeout)


def tree(*roots: Path) -> dict[str, str]:
    """Every file and folder under roots with its content hash: any change shows as a difference."""
    out = {}
    for root in roots:
        paths = [root, *root.rglob("*")] if root.is_dir() else [root]
        for p in paths:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def assert_one_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2 with exactly one `error:` line holding every fragment, no traceback, no retry noise."""
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text and not any(noise in text for noise in HUB_NOISE), text
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, text
    assert proc.stderr.rstrip().splitlines()[-1] == errors[0], text
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def out(tmp_path) -> Path:
    """An output folder that already holds a run, which a failed command must leave as it was."""
    earlier = tmp_path / "out" / "earlier"
    (earlier / "step-000001").mkdir(parents=True)
    (earlier / "config.yaml").write_text("config_name: earlier\n")
    (earlier / "training_metrics.json").write_text(json.dumps({"history": [{"step": 1, "train_loss": 2.0}]}))
    (earlier / "step-000001" / "trainer_state.json").write_text(json.dumps({"step": 1}))
    return tmp_path / "out"


def train_fails(out: Path, args: list[str], *fragments: str, inputs: tuple[Path, ...] = (), env=None,
                timeout: int = 120) -> str:
    before = tree(out, *inputs)
    proc = trainer(["train", *TINY, "--output_dir", str(out), "--run_name", "new", *args], env, timeout)
    line = assert_one_line(proc, *fragments)
    assert tree(out, *inputs) == before
    return line


# --- the YAML config -----------------------------------------------------------------------------

@pytest.mark.parametrize("content, line, fragment", [
    (b"max_steps: 2\nrun_name: caf\xe9\n", 2, "not UTF-8 text (byte 0xe9)"),  # Latin-1, not UTF-8
    (b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)), 2, "not UTF-8 text (byte 0x80)"),  # binary (0x0a is a line)
    (b"max_steps: 2\n\x00\x00\x01\x02\n", 2, "not YAML text (character #x0000"),  # valid UTF-8, not text
], ids=["latin-1", "binary", "nul"])
def test_config_that_is_not_text(tmp_path, out, content, line, fragment):
    config = tmp_path / "run.yaml"
    config.write_bytes(content)
    train_fails(out, ["--config", str(config)], f"{config}:{line}: {fragment}", inputs=(config,))


def test_config_that_is_a_folder(tmp_path, out):
    (tmp_path / "configs").mkdir()
    train_fails(out, ["--config", str(tmp_path / "configs")], f"--config {tmp_path / 'configs'}: is a folder")


# --- bytes that are not UTF-8 in a dataset -------------------------------------------------------

def records(n: int) -> list[bytes]:
    return [json.dumps({"instruction": f"Repeat the word {i}.", "input": "", "output": f"word {i}"}).encode()
            for i in range(n)]


def write_dataset(path: Path, n: int = 40) -> Path:
    """n good records and, on line 3 (of a CSV too, after its header), one with a Latin-1 byte."""
    bad = b'{"instruction": "Say caf\xe9.", "input": "", "output": "caf\xe9"}'
    rows = records(n)
    rows.insert(2, bad)
    if path.suffix == ".jsonl":
        path.write_bytes(b"\n".join(rows) + b"\n")
    elif path.suffix == ".json":
        path.write_bytes(b"[\n" + b",\n".join(rows) + b"\n]\n")
    else:
        lines = [b"instruction,input,output"] + [b"Repeat the word %d.,,word %d" % (i, i) for i in range(n)]
        lines.insert(2, b"Say caf\xe9.,,caf\xe9")
        path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_a_bad_byte_in_a_dataset_is_a_skipped_line(tmp_path):
    """Without --strict, a line with a byte that is not UTF-8 is skipped and counted; the run trains."""
    data = write_dataset(tmp_path / "data.jsonl")
    proc = trainer(["train", *TINY, "--dataset", str(data), "--val_fraction", "0.1",
                    "--output_dir", str(tmp_path / "out"), "--run_name", "ok"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "40 records, skipped 1 malformed (1 not UTF-8 text; first at line 3)" in proc.stdout
    assert (tmp_path / "out" / "ok" / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_a_bad_byte_under_strict_names_file_and_line(tmp_path, out, suffix):
    data = write_dataset(tmp_path / f"data{suffix}")
    train_fails(out, ["--dataset", str(data), "--strict"], f"error: {data}:3: not UTF-8 text", inputs=(data,))


def test_a_csv_header_that_is_not_utf8(tmp_path, out):
    """Today `datasets` says only "An error occurred while generating the dataset"."""
    data = tmp_path / "latin1.csv"
    data.write_bytes(b"instrucci\xf3n,input,output\nSay hi.,,hi\n")
    train_fails(out, ["--dataset", str(data)], f"{data}:1: not UTF-8 text in the header", inputs=(data,))


# --- damaged weights, mismatched config, pickled weights -----------------------------------------

@pytest.fixture(scope="module")
def model_folders(tmp_path_factory) -> dict[str, Path]:
    """A tiny good Hugging Face folder and one broken copy per case."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.training.models import build_demo_tokenizer

    root = tmp_path_factory.mktemp("models")
    good = root / "good"
    tokenizer = build_demo_tokenizer(["Repeat the word 1.", "### Instruction:\n", "### Response:\n"] * 4, 300)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(good)
    tokenizer.save_pretrained(good)
    folders = {"good": good}
    for case in ("empty", "truncated", "damaged", "sizes", "layers", "pickled"):
        folders[case] = shutil.copytree(good, root / case)
    weights = (good / "model.safetensors").read_bytes()
    (folders["empty"] / "model.safetensors").write_bytes(b"")
    (folders["truncated"] / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (folders["damaged"] / "model.safetensors").write_bytes(weights[:8] + b"\xff" * 32 + weights[40:])
    for case, change in (("sizes", {"hidden_size": 32, "intermediate_size": 64}), ("layers", {"num_hidden_layers": 2})):
        cfg = json.loads((folders[case] / "config.json").read_text())
        (folders[case] / "config.json").write_text(json.dumps({**cfg, **change}))
    (folders["pickled"] / "model.safetensors").unlink()
    torch.save(model.state_dict(), folders["pickled"] / "pytorch_model.bin")
    return folders


WEIGHT_CASES = {
    "empty": "model.safetensors is empty (0 bytes)",
    "truncated": "model.safetensors is damaged or cut short",
    "damaged": "model.safetensors is damaged or cut short",
    "sizes": "config.json does not match the weights (12 weight(s) have other sizes than config.json says, e.g. "
             "lm_head.weight is [",
    "layers": "config.json does not match the weights (9 weight(s) that config.json asks for are not in the weights",
    "pickled": "only pickled weights (pytorch_model.bin), and Stepwise never unpickles",
}


@pytest.mark.parametrize("case", ["empty", "truncated", "damaged", "sizes", "pickled"])
def test_train_from_bad_weights(model_folders, out, case):
    folder = model_folders[case]
    train_fails(out, ["--pretrained_model", str(folder)], f"error: --pretrained_model {folder}: {WEIGHT_CASES[case]}",
                inputs=(folder,))


@pytest.mark.parametrize("case", sorted(WEIGHT_CASES))
def test_load_model_from_bad_weights(model_folders, case):
    """The loader of `trainer eval`, the REPL's /load and the web app's columns."""
    before = tree(model_folders[case])
    with pytest.raises(StepwiseError) as err:
        load_model(model_folders[case], device="cpu")
    message = str(err.value)
    assert message.startswith(f"{model_folders[case]}: {WEIGHT_CASES[case]}") and "\n" not in message
    assert tree(model_folders[case]) == before


def test_pickled_weights_say_how_to_convert(model_folders):
    from transformers import AutoModelForCausalLM

    with pytest.raises(StepwiseError) as err:
        load_model(model_folders["pickled"], device="cpu")
    command = str(err.value).split("python -c ", 1)[1]
    assert "save_pretrained" in command and str(model_folders["pickled"]) in command
    # The suggested command (the user's explicit choice to unpickle) gives a folder Stepwise loads.
    converted = shutil.copytree(model_folders["pickled"], model_folders["pickled"].parent / "converted")
    AutoModelForCausalLM.from_pretrained(converted).save_pretrained(converted)
    assert load_model(converted, device="cpu").model is not None


@pytest.mark.parametrize("case", ["truncated", "sizes", "pickled"])
def test_eval_of_bad_weights(model_folders, out, case):
    folder = model_folders[case]
    before = tree(out, folder)
    proc = trainer(["eval", str(folder), "--root", str(out), "--limit", "2"])
    assert_one_line(proc, f"error: {folder}: {WEIGHT_CASES[case]}")
    assert tree(out, folder) == before


# --- generation settings -------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["temperature", "top_p", "repetition_penalty"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_generation_settings(flag, value):
    with pytest.raises(StepwiseError, match=f"^--{flag} must be") as err:
        GenerationSettings(**{flag: value})
    assert "\n" not in str(err.value)


def test_eval_temperature_nan(model_folders, out):
    before = tree(out)
    proc = trainer(["eval", str(model_folders["good"]), "--root", str(out), "--temperature", "nan"])
    assert_one_line(proc, "error: --temperature must be a finite number >= 0, got nan")
    assert tree(out) == before


# --- a hub id while the hub cannot be reached ----------------------------------------------------

# HF_HUB_OFFLINE=1; a hub endpoint on a closed local port (refused at once, whatever the network);
# and this machine's own network, when it cannot reach the hub (the case that took 30-55 s of retries).
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": None}
CLOSED_PORT = {"HF_HUB_OFFLINE": None, "HF_ENDPOINT": "http://127.0.0.1:9"}
NO_NETWORK = {"HF_HUB_OFFLINE": None, "HF_ENDPOINT": None}


@pytest.mark.parametrize("env, fix", [(OFFLINE, "unset HF_HUB_OFFLINE"), (CLOSED_PORT, "check the network"),
                                      (NO_NETWORK, "check the network")], ids=["offline", "closed-port", "network"])
@pytest.mark.parametrize("flag, local", [("--pretrained_model", "a local model folder"),
                                         ("--dataset", "a local .json, .jsonl, .parquet or .csv file")])
def test_hub_id_without_the_hub(out, env, fix, flag, local):
    if env is NO_NETWORK and hub_unreachable(offline=False) is None:
        pytest.skip("this machine reaches the Hugging Face hub")
    start = time.monotonic()
    train_fails(out, [flag, "stepwise-test/no-such-repo"], f"error: {flag} stepwise-test/no-such-repo: ",
                "and it is not in the local Hugging Face cache", f"pass {local}, or {fix}", env=env, timeout=90)
    seconds = time.monotonic() - start
    assert seconds < 60, f"{seconds:.0f} s (the hub client's retries?)"


def test_eval_of_a_hub_id_without_the_hub(out):
    before = tree(out)
    proc = trainer(["eval", "stepwise-test/no-such-repo", "--root", str(out)], env=CLOSED_PORT, timeout=90)
    assert_one_line(proc, "error: stepwise-test/no-such-repo: the Hugging Face hub (127.0.0.1:9) cannot be reached")
    assert tree(out) == before
