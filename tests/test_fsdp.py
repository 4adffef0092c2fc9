"""--fsdp on two real CPU processes (torchrun, gloo): the same losses as DDP and as one process, a
checkpoint in the one-process layout that plain transformers loads, and an exact resume.

The runs are shared (module fixture): one process, DDP, FSDP with gradient checkpointing, and a resume of
the FSDP run from its first checkpoint. Two accumulation steps per process exercise FSDP2's gradient
sync switch; an odd number of validation batches makes one rank run a filler batch; two held-out
prompts make rank 0 generate with the gathered copy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.support import ROOT, run_trainer

STEPS = 4
ARGS = ["--demo_records", "300", "--context_length", "96", "--mini_batch_size", "2",
        # 768 tokens a step: 2 micro batches on each of 2 processes, 4 on one process
        "--total_batch_size", str(2 * 96 * 2 * 2), "--max_steps", str(STEPS), "--eval_freq", "2",
        "--checkpoint_freq", "2", "--log_freq", "1", "--eval_max_batches", "3", "--learning_rate", "3e-3",
        "--warmup_ratio", "0.1", "--progress", "false", "--use_tensorboard", "false",
        "--eval_prompts", "eval_prompts/demo_ifeval.jsonl", "--eval_num_prompts", "2", "--eval_max_new_tokens", "8"]


def torchrun(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "trainer", "train", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fsdp")
    args = [*ARGS, "--output_dir", str(out)]
    procs = {"one": run_trainer(["train", *args, "--fsdp", "--run_name", "one"], env={"OMP_NUM_THREADS": "1"},
                                timeout=400),
             "ddp": torchrun([*args, "--run_name", "ddp"]),
             "fsdp": torchrun([*args, "--fsdp", "--gradient_checkpointing", "--run_name", "fsdp"])}
    # A run killed after its first checkpoint: the folder as it then was, resumed under FSDP.
    shutil.copytree(out / "fsdp", out / "cut", ignore=shutil.ignore_patterns(f"step-{STEPS:06d}", "final"))
    procs["cut"] = torchrun(["--output_dir", str(out), "--run_name", "cut", "--resume"])
    return {"root": out, **procs}


def history(run: Path) -> list[dict]:
    return json.loads((run / "training_metrics.json").read_text())["history"]


def test_fsdp_losses_equal_ddp_and_one_process(runs):
    one, ddp, fsdp = (history(runs["root"] / name) for name in ("one", "ddp", "fsdp"))
    assert [h["step"] for h in fsdp] == [h["step"] for h in ddp] == [h["step"] for h in one] == list(range(1, STEPS + 1))
    for a, b, c in zip(one, ddp, fsdp):
        for key in ("train_loss", "val_loss"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-5 and abs(a[key] - c[key]) < 1e-5, (key, a, b, c)
        # The clipped norm is the global one over the DTensor grads, not a shard's (that would be ~30% off):
        # equal up to float32 summation order (one process sums each whole tensor, off float64 by ~1e-5).
        assert abs(a["grad_norm"] - c["grad_norm"]) < 1e-4 * a["grad_norm"], (a, c)
        assert a["tokens"] == b["tokens"] == c["tokens"]
    assert len([h for h in fsdp if "val_loss" in h]) == STEPS // 2


def test_fsdp_says_whether_it_shards(runs):
    assert "--fsdp: one process, nothing to shard: training unsharded" in runs["one"].stdout
    assert "sharded over 2 processes (FSDP2)" in runs["fsdp"].stdout and "FSDP2" not in runs["ddp"].stdout


def test_fsdp_checkpoint_is_the_one_process_layout_and_loads_in_plain_transformers(runs):
    step = f"step-{STEPS:06d}"
    fsdp, ddp = runs["root"] / "fsdp" / step, runs["root"] / "ddp" / step
    assert sorted(p.name for p in fsdp.iterdir()) == sorted(p.name for p in ddp.iterdir())
    assert (runs["root"] / "fsdp" / "final" / "model.safetensors").is_file()
    trained = AutoModelForCausalLM.from_pretrained(fsdp, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(ddp, dtype=torch.float32)
    ours, theirs = dict(trained.named_parameters()), dict(reference.named_parameters())
    assert ours.keys() == theirs.keys()
    for name, p in ours.items():
        assert torch.isfinite(p).all(), name
        torch.testing.assert_close(p, theirs[name], atol=1e-5, rtol=0, msg=name)
    initial = AutoModelForCausalLM.from_pretrained(runs["root"] / "fsdp" / "step-000002", dtype=torch.float32)
    assert not torch.equal(initial.model.embed_tokens.weight, trained.model.embed_tokens.weight), "it trained"
    # The gathered optimizer state is the one-process state dict: same names, shapes and values.
    a, b = load_file(fsdp / "optimizer.safetensors"), load_file(ddp / "optimizer.safetensors")
    assert a.keys() == b.keys() and len(a) == 3 * len(ours)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0, msg=key)
    assert json.loads((fsdp / "optimizer.json").read_text()) == json.loads((ddp / "optimizer.json").read_text())
    # Held-out answers generated on rank 0 from the gathered copy are DDP's answers.
    rows = [json.loads(line) for line in (fsdp / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows == [json.loads(line) for line in (ddp / "samples.jsonl").read_text().splitlines()]


def test_fsdp_resume_equals_the_uninterrupted_run(runs):
    assert "resumed from" in runs["cut"].stdout and "step-000002" in runs["cut"].stdout
    straight, resumed = history(runs["root"] / "fsdp"), history(runs["root"] / "cut")

    def timeless(h):
        return [{k: v for k, v in e.items() if k != "tokens_per_s"} for e in h]

    assert timeless(resumed) == timeless(straight), "the same losses, norms, val losses and scores, bitwise"
    step = f"step-{STEPS:06d}"
    a, b = load_file(runs["root"] / "cut" / step / "model.safetensors"), load_file(runs["root"] / "fsdp" / step / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def test_fsdp_with_compile_is_one_line(tmp_path):
    proc = run_trainer(["train", "--fsdp", "--compile", "--output_dir", str(tmp_path)], check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and "--fsdp with --compile" in proc.stderr, proc.stderr
    assert not any(tmp_path.iterdir()), "nothing written"


def test_optimizer_state_by_name_and_back_is_the_one_process_state_dict():
    """What rank 0 converts between torch.distributed.checkpoint's names and the saved indices."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.training.distributed import by_index, by_name, param_names

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": [p for p in model.parameters() if p.dim() < 2]}])
    before = optimizer.state_dict()
    assert by_index(before, param_names(model, optimizer)) == before, "indices (no state yet) pass through"
    x = torch.randint(0, 64, (1, 8))
    model(input_ids=x, labels=x).loss.backward()
    optimizer.step()
    names = param_names(model, optimizer)
    assert names[0] == "model.embed_tokens.weight" and len(names) == len(set(names)) == len(list(model.parameters()))
    state = optimizer.state_dict()
    named = by_name(state, names)
    assert set(named["state"]) == set(names) and named["param_groups"][1]["params"] == names[len(decay):]
    assert by_index(named, names) == state
