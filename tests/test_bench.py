"""bench/train_throughput.py at its smallest (--quick: the demo shape, context 128, one round of one
warm-up and one timed step), run as `make bench` runs it, in a subprocess. No timing is asserted (the
machine is shared); what is asserted is what makes the ratios mean something: every side printed its
row and its ratio and memory lines, with a finite loss, and the sides that train the same batches from
the same weights computed the same first-step loss (TRL's padding-free rows included: attention stays
within each example) and the same timed loss."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch

from bench.flops import flops_per_token, linear_shapes, matmul_params
from tests.support import ROOT, SHARED, python_env

BENCH = ROOT / "bench" / "train_throughput.py"
ALPACA = SHARED / "alpaca" / "alpaca_en_demo.json"
PEERS = ("hf-trainer-grouped", "hf-trainer-default", "trl-sft-grouped", "trl-sft-padding-free")
ROW = re.compile(r"^(?P<name>[a-z-]+)\s+(?P<sup>[\d,]+)\s+(?P<tps>[\d,]+)\s+(?P<rss>[\d,]+)\s+(?P<mfu>[\d.]+)%\s+"
                 r"(?P<loss>\S+)\s+(?P<rel>\S+)(?: (?P<ok>ok|OFF))?\s+(?P<first>\S+)$")


def run_bench(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *args], cwd=ROOT, env=python_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def small_alpaca(tmp_path) -> list[str]:
    """--dataset with the shared Alpaca file's first 300 records (less to tokenise, twice), where it exists."""
    if not ALPACA.is_file():
        return []
    path = tmp_path / "alpaca300.json"
    path.write_text(json.dumps(json.loads(ALPACA.read_text())[:300]))
    return ["--dataset", str(path)]


@pytest.mark.slow
def test_quick_bench_prints_every_side_with_equal_numerics(small_alpaca):
    proc = run_bench("--quick", "--steps", "1", *small_alpaca)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    rows = {m["name"]: m for m in map(ROW.match, out.splitlines()) if m}
    assert set(rows) == {"stepwise", *PEERS}, out
    for name, row in rows.items():
        assert math.isfinite(float(row["loss"])), row.group(0)
        assert int(row["rss"].replace(",", "")) > 0 and int(row["sup"].replace(",", "")) > 0, row.group(0)
    for name in PEERS:
        assert re.search(rf"^ratio stepwise / {name}: \d+\.\d\dx", out, re.M), out
        assert re.search(rf"^memory stepwise / {name}: \d+\.\d\dx", out, re.M), out
        # The first step is the same batch from the same weights on every side.
        assert float(rows[name]["first"]) < 1e-4, rows[name].group(0)
    for name in ("hf-trainer-grouped", "trl-sft-grouped", "trl-sft-padding-free"):  # Stepwise's very batches
        assert rows[name]["ok"] == "ok", rows[name].group(0)
    assert "GEMM peak" in out and "non-padding share" in out, out


@pytest.mark.slow
def test_gpu_script_runs_its_smoke_size_here(small_alpaca):
    """bench/gpu.sh, the script a lent GPU machine runs, at its smoke size on this CPU: the bf16 training
    rows of just the two sides it asks for (--sides) with equal first-step losses, and a generation rate.
    Its GPU figures need a GPU."""
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--smoke"], cwd=ROOT,
                          env={**python_env(), "PYTHON": sys.executable}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.startswith("device: CPU") and "bf16 on cpu" in out, out
    rows = {m["name"]: m for m in map(ROW.match, out.splitlines()) if m}
    assert set(rows) == {"stepwise", "hf-trainer-grouped"}, out
    assert float(rows["hf-trainer-grouped"]["first"]) < 1e-2, rows["hf-trainer-grouped"].group(0)  # bf16
    assert re.search(r"^ratio stepwise / hf-trainer-grouped: \d+\.\d\dx", out, re.M), out
    rate = re.search(r"^demo .* ([\d,]+) tokens in [\d.]+ s = ([\d,]+) generated tok/s", out, re.M)
    assert rate and int(rate[1].replace(",", "")) == 8 * 8, out  # 8 prompts run to 8 new tokens (untrained)


@pytest.mark.parametrize("flag,value", [("--shapes", "demo,gpt5"), ("--dtype", "fp16"),
                                        ("--sides", "hf-trainer-grouped"), ("--sides", "stepwise,gpt5")])
def test_bad_flag_is_one_line_exit_2(flag, value):
    proc = run_bench(flag, value, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and flag in proc.stderr, proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("tied", [True, False])
def test_gemm_shapes_are_every_linear_layer_and_flops_count_the_head_once(tied):
    """The peak is measured on exactly the model's matmuls, and FLOPs per token follow the docstring's formula."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.train_throughput import SMOLLM2_SHAPES

    config = LlamaConfig(**{**SMOLLM2_SHAPES, "tie_word_embeddings": tied})
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    linears = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert sum(n_in * n_out * count for n_in, n_out, count in linear_shapes(config)) == linears
    norms = sum(p.numel() for name, p in model.named_parameters() if "norm" in name)
    assert matmul_params(model) == linears + norms  # the input embedding out, the head in (once)
    assert 130e6 < sum(p.numel() for p in model.parameters()) - (0 if tied else 28_311_552) < 140e6  # SmolLM2-135M
    assert flops_per_token(model, 200.0) == 6 * matmul_params(model) + 12 * 30 * 576 * 200.0
