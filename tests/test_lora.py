"""LoRA through peft (`--lora_r`): adapter step folders in PEFT's format, final/ merged into plain HF
weights with the adapter beside it, an exact resume, and adapters of one run sharing one loaded base
in the front ends' model cache. The base is a real (tiny) pretrained model: the demo run's final/."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.session import ModelCache
from tests.support import run_trainer
from trainer.core.catalog import checkpoint_label, list_steps, read_run
from trainer.core.errors import StepwiseError
from trainer.inference.loading import load_model

LORA = ["--dataset", "demo", "--demo_records", "200", "--context_length", "64", "--mini_batch_size", "4",
        "--max_steps", "6", "--eval_freq", "2", "--checkpoint_freq", "2", "--log_freq", "1", "--learning_rate", "1e-2",
        "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.1", "--eval_prompts", "eval_prompts/demo_ifeval.jsonl",
        "--eval_num_prompts", "2", "--eval_max_new_tokens", "8", "--use_tensorboard", "false", "--progress", "false"]
IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])


@pytest.fixture(scope="module")
def base(tiny_run) -> Path:
    return tiny_run / "final"


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory) -> tuple[Path, str]:
    """A 6-step LoRA run on the tiny pretrained model: step-000002/4/6 and final/; (run folder, log)."""
    out = tmp_path_factory.mktemp("lora")
    proc = run_trainer(["train", "--pretrained_model", str(base), *LORA, "--output_dir", str(out), "--run_name", "lora"])
    return out / "lora", proc.stdout + proc.stderr


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def history(run: Path) -> list[dict]:
    return json.loads((run / "training_metrics.json").read_text())["history"]


def test_step_folders_hold_the_adapter_in_peft_format(lora_run, base):
    run, log = lora_run
    assert "LoRA r=4 alpha=8 on all-linear:" in log and "trainable parameters of" in log
    assert list_steps(run) == [2, 4, 6]
    step = run / "step-000002"
    names = {p.name for p in step.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors", "trainer_state.json",
            "tokenizer.json", "samples.jsonl"} <= names
    assert "model.safetensors" not in names and "config.json" not in names, "no full weights in an adapter step"
    config = json.loads((step / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve()) and config["r"] == 4
    assert config["lora_alpha"] == 8 and set(config["target_modules"]) >= {"q_proj", "v_proj", "down_proj"}
    assert "lm_head" not in config["target_modules"]
    tensors = load_file(str(step / "adapter_model.safetensors"))
    assert tensors and all(bool(t.isfinite().all()) for t in tensors.values())
    assert any(k.endswith("lora_B.weight") and t.abs().sum() > 0 for k, t in tensors.items()), "the adapter trained"
    size = sum(p.stat().st_size for p in step.iterdir())
    base_size = (base / "model.safetensors").stat().st_size
    print(f"\nLoRA step folder {size / 1e3:.0f} kB (base weights {base_size / 1e6:.1f} MB)")
    assert size < base_size / 5


def test_final_is_the_best_adapter_merged_into_plain_weights(lora_run, base):
    from transformers import AutoModelForCausalLM

    run, _ = lora_run
    final = run / "final"
    best = json.loads((run / "training_metrics.json").read_text())["best"]["checkpoint"]
    assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()
    assert (final / "adapter" / "adapter_model.safetensors").is_file() and not (final / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(final))
    assert not hasattr(merged, "peft_config"), "plain weights, no adapter needed"
    weights = load_file(str(final / "model.safetensors"))
    assert all(bool(t.isfinite().all()) for t in weights.values())
    base_weights = load_file(str(base / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(weights[q], base_weights[q]), "the adapter is merged in"
    assert torch.equal(weights["model.norm.weight"], base_weights["model.norm.weight"]), "LoRA left the norms alone"
    on_base = load_model(run / best, "cpu")
    assert torch.allclose(logits(merged), logits(on_base.model), atol=1e-5)
    assert read_run(run).checkpoints[-1].adapter == "LoRA r=4, merged"


def test_adapter_steps_load_with_plain_transformers_too(lora_run):
    from transformers import AutoModelForCausalLM

    run, _ = lora_run
    plain = AutoModelForCausalLM.from_pretrained(str(run / "step-000004"))  # transformers' own peft integration
    ours = load_model(run / "step-000004", "cpu")
    assert torch.equal(logits(plain), logits(ours.model))


def test_resume_of_a_lora_run_is_exact(lora_run, tmp_path):
    """The run cut after step 2 (later checkpoints gone, as after a crash) and resumed replays steps
    3-6 bitwise: the same losses and the same adapter weights."""
    run, _ = lora_run
    cut = tmp_path / "lora"
    shutil.copytree(run, cut)
    for name in ("step-000004", "step-000006", "final"):
        shutil.rmtree(cut / name)
    proc = run_trainer(["train", "--output_dir", str(tmp_path), "--run_name", "lora", "--resume"])
    assert "resumed from" in proc.stdout + proc.stderr
    straight = {h["step"]: (h.get("train_loss"), h.get("val_loss")) for h in history(run)}
    resumed = {h["step"]: (h.get("train_loss"), h.get("val_loss")) for h in history(cut)}
    assert resumed == straight
    a = load_file(str(run / "step-000006" / "adapter_model.safetensors"))
    b = load_file(str(cut / "step-000006" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adapters_of_a_run_share_one_base_in_the_cache(lora_run):
    run, _ = lora_run
    cache = ModelCache(budget_bytes=1 << 30, device="cpu")
    first = cache.get(run / "step-000002")
    start = time.perf_counter()
    second = cache.get(run / "step-000004")
    switch = time.perf_counter() - start
    print(f"\nswitching between adapters of one run: {switch * 1000:.0f} ms (the base stays loaded)")
    assert cache.bases.loads == 1, "the base is loaded once for both adapters"
    assert second.nbytes < cache.bases.nbytes / 5, "an adapter entry holds only its LoRA weights"
    assert not torch.equal(logits(first.model), logits(second.model)), "each column runs its own adapter"
    again = load_model(run / "step-000002", "cpu")
    assert torch.equal(logits(first.model), logits(again.model)), "sharing the base changes no answer"
    assert checkpoint_label(run / "step-000004") == second.label
    assert "step 4 · LoRA r=4" in second.label


def test_eval_labels_adapter_checkpoints(lora_run):
    run, _ = lora_run
    proc = run_trainer(["eval", str(run / "step-000002"), "--limit", "2", "--max_new_tokens", "4"])
    assert "step-000002 · LoRA r=4" in proc.stdout


def test_lora_mistakes_are_one_line(base, lora_run, tmp_path):
    for args, needle in [
        (["--lora_r", "4"], "--lora_r needs --pretrained_model"),
        (["--pretrained_model", str(base), "--lora_r", "4", "--lora_target_modules", "nope_proj"], "--lora_target_modules"),
        (["--pretrained_model", str(base), "--lora_r", "-1"], "--lora_r must be >= 0"),
    ]:
        proc = run_trainer(["train", *args, "--max_steps", "1", "--output_dir", str(tmp_path)], check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and needle in proc.stderr, proc.stderr
    run, _ = lora_run
    damaged = tmp_path / "damaged"
    shutil.copytree(run / "step-000002", damaged)
    (damaged / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(StepwiseError, match="adapter_model.safetensors is damaged"):
        load_model(damaged, "cpu")
    moved = tmp_path / "moved"
    shutil.copytree(run / "step-000002", moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(StepwiseError, match="is not there any more"):
        load_model(moved, "cpu")


def test_two_adapters_answer_side_by_side(lora_run):
    """The front ends' comparison session streams two adapters of one run at once (each in its own
    thread, on the one shared base) and each answers as it does alone."""
    from app.session import CompareSession
    from trainer.inference.generate import GenerationSettings, generate_batch

    run, _ = lora_run
    settings = GenerationSettings(max_new_tokens=8)
    session = CompareSession(["lora/step-000002", "lora/step-000006"], settings=settings, root=run.parent)
    final = list(session.stream_all("Write the word blue in capitals."))[-1]
    assert all(g is not None and g.done for g in final)
    assert session.cache.bases.loads == 1
    conversation = [[{"role": "user", "content": "Write the word blue in capitals."}]]
    for side, g in zip(session.sides, final):
        alone = load_model(run.parent / side.path, "cpu")
        assert g.text == generate_batch(alone.model, alone.tokenizer, conversation, settings)[0].text
        assert "LoRA r=4" in side.label
