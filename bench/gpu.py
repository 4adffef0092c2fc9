"""The GPU report (bench/gpu.sh runs it on a lent GPU machine): for SmolLM2-135M's and SmolLM2-1.7B's
shapes, built from configs (nothing can be downloaded there), in bf16:

  training    bench/train_throughput.py with the stepwise and hf-trainer-grouped sides: supervised and
              non-padding tok/s, MFU against a bf16 GEMM peak measured there at the model's shapes, peak
              GPU memory (PyTorch's allocator), and the ratio lines;
  generation  trainer eval's path (trainer.inference.generate.generate_batch: length-sorted, left-padded,
              KV-cached batches through model.generate, greedy) on the demo's IFEval-style prompts:
              generated tok/s at trainer eval's batch size.

The models are untrained, so answers run to --max_new_tokens (an EOS is a 1-in-49,152 draw): both shapes
decode the same number of steps a batch, and the rate is the work of a full-length eval.

    bash bench/gpu.sh            # on the GPU machine: under 8 minutes
    bash bench/gpu.sh --smoke    # anywhere (a CPU too): the demo shape, a few steps; checks the script
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.cli.args import ArgumentParser, run_command  # noqa: E402

PROMPTS = ROOT / "eval_prompts" / "demo_ifeval.jsonl"


def device_line() -> str:
    import transformers

    where = (f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
             if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads (no GPU: figures are not a GPU's)")
    return f"device: {where}; torch {torch.__version__}, transformers {transformers.__version__}"


def training(args) -> int:
    """bench/train_throughput.py in a subprocess, its output passed through; its exit code."""
    flags = ["--dtype", "bf16", "--sides", "stepwise,hf-trainer-grouped", "--dataset", args.dataset]
    if args.smoke:
        flags += ["--quick", "--steps", "1"]
    else:
        flags += ["--shapes", "smollm2,smollm2-1.7b", "--smollm2", "config", "--rounds", "1",
                  "--warmup", "2", "--steps", str(args.steps), "--mini_batch_size", str(args.mini_batch_size),
                  "--context_length", "512"]
    print(f"\n== training: bench/train_throughput.py {' '.join(flags)} ==", flush=True)
    return subprocess.run([sys.executable, str(ROOT / "bench" / "train_throughput.py"), *flags], cwd=ROOT).returncode


def model_of(shape: str, tokenizer, dtype: torch.dtype, device: str):
    """An untrained model of a bench shape (the demo's own, or SmolLM2's from a LlamaConfig), in dtype on device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.train_throughput import CONFIG_SHAPES
    from trainer.training.models import build_demo_model

    torch.manual_seed(0)
    if shape == "demo":
        model = build_demo_model(tokenizer, 512, seed=0)
    else:
        config = LlamaConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, **CONFIG_SHAPES[shape][1])
        with torch.device(device):
            model = LlamaForCausalLM(config)
    return model.to(device=device, dtype=dtype).eval()


def generation(args) -> None:
    """generate_batch's tok/s per shape, greedy, at trainer eval's batch size."""
    from trainer.evals.prompts import load_prompts
    from trainer.inference.generate import GenerationSettings, generate_batch
    from trainer.training.data import demo_records
    from bench.train_throughput import CONFIG_SHAPES
    from trainer.training.models import DEMO_VOCAB, build_demo_tokenizer, demo_texts

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = ["demo"] if args.smoke else ["smollm2", "smollm2-1.7b"]
    prompts = load_prompts(PROMPTS)[: args.prompts]
    conversations = [[{"role": "user", "content": p.prompt}] for p in prompts]
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=0.0)
    print(f"\n== generation: trainer eval's generate_batch, {len(conversations)} prompts of {PROMPTS.name}, greedy, "
          f"max_new_tokens {args.max_new_tokens}, batch size {args.batch_size}, bf16 weights, untrained models ==",
          flush=True)
    texts = demo_texts(demo_records(2000, seed=0))
    tokenizers = {}  # by vocabulary size: both SmolLM2 shapes share one
    for shape in shapes:
        vocab = DEMO_VOCAB if shape == "demo" else CONFIG_SHAPES[shape][1]["vocab_size"]
        if vocab not in tokenizers:
            tokenizers[vocab] = build_demo_tokenizer(texts, vocab_size=vocab)
        tokenizer = tokenizers[vocab]
        model = model_of(shape, tokenizer, torch.bfloat16, device)
        generate_batch(model, tokenizer, conversations[: args.batch_size], GenerationSettings(max_new_tokens=4),
                       batch_size=args.batch_size)  # warm-up: kernels, allocator
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        gens = generate_batch(model, tokenizer, conversations, settings, batch_size=args.batch_size)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        tokens = sum(g.new_tokens for g in gens)
        memory = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:,.0f} MB" if device == "cuda" else ""
        params = sum(p.numel() for p in model.parameters())
        print(f"{shape:<13} {params / 1e6:8.1f}M parameters: {tokens:,} tokens in {seconds:.2f} s = "
              f"{tokens / seconds:,.0f} generated tok/s{memory}", flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="bench/gpu.py", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="the demo shape and a few steps: a check of the script")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per side")
    parser.add_argument("--mini_batch_size", type=int, default=16)
    parser.add_argument("--dataset", default="demo", help="the training data (the demo's own: nothing is fetched)")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=16, help="generation batch (trainer eval's default)")
    parser.add_argument("--skip_training", action="store_true")
    parser.add_argument("--skip_generation", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.prompts, args.max_new_tokens = min(args.prompts, 8), min(args.max_new_tokens, 8)
        args.batch_size = min(args.batch_size, 4)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(device_line(), flush=True)
    code = 0 if args.skip_training else training(args)
    if not args.skip_generation:
        generation(args)
    return code


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:]))
