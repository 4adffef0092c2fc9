"""Shared fixtures: tiny checkpoints and runs, each built once per session by the trainer's own writers
(tests/support.py) or by a real `python -m trainer train`. A test that adds checkpoints or votes to a
root works on its own copy (support.copy_root); `trainer eval` results land in eval_root's run, which
only test_evaluate reads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.support import (
    ANSWER_PROMPTS,
    ANSWERS,
    HEADINGS,
    PAIRS,
    SHARED,
    TINY_ARGS,
    WEB_PROMPTS,
    Step,
    Tiny,
    run_trainer,
    save_model,
    tiny_tokenizer,
    train_tiny,
    write_run,
)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """checkpoints/<run>/ of a real 30-step demo run: step-000010/20/30 and final/."""
    out = tmp_path_factory.mktemp("runs")
    run_trainer(["train", *TINY_ARGS, "--output_dir", str(out), "--run_name", "tiny"])
    return out / "tiny"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return SHARED


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory) -> Path:
    """A Hugging Face folder outside any run: the demo Llama trained on support.PAIRS, so its greedy
    answers differ by prompt, end with EOS, and carry over to a second turn."""
    texts = [t for q, a in PAIRS for t in (q, a)] * 4 + HEADINGS
    tiny = train_tiny(tiny_tokenizer(texts, vocab_size=320), [[p] for p in PAIRS], steps=60)
    return save_model(tiny, tmp_path_factory.mktemp("trained") / "tiny")


def _metrics(val_losses: dict[int, float], best: int, **extra) -> dict:
    """training_metrics.json of a run evaluated at each checkpoint, `best` the best of them."""
    history = [{"step": s, "epoch": 1.0, "train_loss": 3.0, "val_loss": v} for s, v in val_losses.items()]
    best_entry = {"step": best, "epoch": 1.0, "val_loss": val_losses[best], "checkpoint": f"step-{best:06d}"}
    return {"history": history, "best": best_entry, **extra}


@pytest.fixture(scope="session")
def answers_root(tmp_path_factory) -> Path:
    """root/tiny/{step-000010, step-000020, final (= step 20)}: each step trained to give its answer in
    support.ANSWERS to any prompt; val losses 2.5 and 1.25, step 20 the best."""
    tok = tiny_tokenizer((ANSWER_PROMPTS + list(ANSWERS.values())) * 5, vocab_size=400)
    losses = {10: 2.5, 20: 1.25}
    steps = [Step(step, train_tiny(tok, [[(p, answer)] for p in ANSWER_PROMPTS], steps=30, seed=step,
                                   context_length=128), losses[step], epoch=1.0)
             for step, answer in ANSWERS.items()]
    root = tmp_path_factory.mktemp("answers")
    write_run(root / "tiny", steps, _metrics(losses, best=20))
    return root


@pytest.fixture(scope="session")
def eval_root(trained_checkpoint, tmp_path_factory) -> Path:
    """root/demo-run/: step-000010 (trained_checkpoint's weights), step-000020 (those perturbed, so it
    answers otherwise), final/ (= step 20); val losses 2.5 and 2.25; a config.yaml of a 40-record demo
    dataset, which the contamination check re-creates."""
    import torch

    from trainer.core.config import Config, DataConfig
    from trainer.inference.loading import load_model

    first, second = (load_model(trained_checkpoint, device="cpu") for _ in range(2))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in second.model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    losses = {10: 2.5, 20: 2.25}
    steps = [Step(10, Tiny(first.model, first.tokenizer), losses[10], epoch=0.5),
             Step(20, Tiny(second.model, second.tokenizer), losses[20], epoch=1.0)]
    root = tmp_path_factory.mktemp("eval") / "checkpoints"
    write_run(root / "demo-run", steps, _metrics(losses, best=20), config=Config(data=DataConfig(demo_records=40)))
    return root


@pytest.fixture(scope="session")
def web_root(tmp_path_factory) -> Path:
    """root/demo/ in the trainer's layout without training (the web tests need the files, not good
    answers): untrained tiny Llamas at steps 10, 20, 30 with val losses 3.0, 2.5 (the best) and 2.7,
    samples.jsonl answering support.WEB_PROMPTS, final/ (= step 20) and the metrics the Training tab
    shows; root/broken/step-000010, whose weights are not safetensors; root/prompts.jsonl."""
    from trainer.evals.heldout import score_generation
    from trainer.evals.prompts import load_prompts
    from trainer.inference.generate import Generation

    root = tmp_path_factory.mktemp("web") / "checkpoints"
    root.mkdir()
    prompt_file = root / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps(p) + "\n" for p in WEB_PROMPTS))
    heldout = load_prompts(prompt_file)
    texts = [p["prompt"] + " " + p["reference"] for p in WEB_PROMPTS] * 4 + HEADINGS
    tok = tiny_tokenizer(texts, vocab_size=300)
    vals = {10: 3.0, 20: 2.5, 30: 2.7}
    history, steps = [], []
    for n, (step, val) in enumerate(vals.items()):
        for s in range(step - 5, step + 1, 5):
            history.append({"step": s, "epoch": s / 100, "train_loss": 3.5 - s / 20, "lr": 1e-3, "tokens": s * 100})
        history[-1].update(val_loss=val, val_ppl=2.718 ** val, if_prompt_strict=0.5, rougeL=0.1 * n)
        samples = [score_generation(p, Generation(f"answer {p.key} at step {step}", True, 5, 0.1)) for p in heldout]
        steps.append(Step(step, train_tiny(tok, [], steps=0, seed=n, context_length=128), val, epoch=step / 100,
                          metrics={"if_prompt_strict": 0.5, "rougeL": 0.1}, samples=samples))
    best = {"step": 20, "epoch": 0.2, "val_loss": 2.5, "checkpoint": "step-000020", "metric": "val_loss", "value": 2.5}
    write_run(root / "demo", steps, {
        "history": history, "best": best,
        "early_stopping": {"metric": "val_loss", "patience": 3, "threshold": 0.0, "best_value": 2.5,
                           "bad_evals": 1, "stopped": False},
        "trend": "overfitting", "stop_reason": "finished: reached 30 steps",
        "recommendation": "overfitting (val loss rising while train loss falls): stop",
        "data": {"train_examples": 570, "val_examples": 30, "steps_per_epoch": 100}})
    broken = root / "broken" / "step-000010"
    shutil.copytree(root / "demo" / "step-000010", broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    return root
