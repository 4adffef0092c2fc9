"""Generation throughput: generate_batch (sorted, left-padded, KV-cached batches) against one prompt at
a time through model.generate, on the same prompts and the same model; the time to generate on and
score Google's whole IFEval file the way `trainer eval` does; then `trainer eval`'s library path
against lm-evaluation-harness's HF backend (its ifeval task, bench/lm_eval_agreement.py's setup) on
the same checkpoint and prompts, greedy, the same max new tokens and batch size, in alternating rounds.

The default model is the demo's tiny Llama, untrained (its tokenizer is trained on demo data), so it
never says EOS and every answer runs to max_new_tokens: both sides do exactly the same number of
decoding steps. With --checkpoint a trained model is used, and answers stop where it ends them.

The lm-eval timing runs on --checkpoint, by default on SmolLM2-135M-Instruct's GGUF (converted once).
Both sides have the model loaded before the clock starts; each side's time is generating and scoring
(for lm-eval, the whole simple_evaluate call: a user pays its fixed costs on every run too).

    .venv/bin/python bench/generation.py [--checkpoint DIR] [--prompts 64] [--max_new_tokens 64]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.cli.args import ArgumentParser  # noqa: E402
from trainer.evals.heldout import heldout_samples
from trainer.evals.prompts import load_prompts  # noqa: E402
from trainer.inference.generate import (
    GenerationSettings,
    _answer,
    _fit,
    _position_limit,
    generate_batch,
    prompt_ids,
    stop_ids,
)
from trainer.inference.loading import load_model

DEMO_PROMPTS = ROOT / "eval_prompts" / "demo_ifeval.jsonl"
IFEVAL = ROOT.parent / "shared" / "data" / "ifeval" / "input_data.jsonl"


def demo_model(context_length: int):
    from trainer.training.data import demo_records
    from trainer.training.models import (
        build_demo_model,
        build_demo_tokenizer,
        demo_texts,
    )

    tokenizer = build_demo_tokenizer(demo_texts(demo_records(2000, seed=0)))
    return build_demo_model(tokenizer, context_length, seed=0).eval(), tokenizer


@torch.inference_mode()
def one_at_a_time(model, tokenizer, conversations, settings) -> tuple[list[str], int, float]:
    """The peer: plain model.generate, one unpadded prompt per call (cut to the model's positions the
    same way generate_batch cuts them, so both see identical inputs)."""
    stops = stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts, tokens = [], 0
    start = time.perf_counter()
    for conversation in conversations:
        ids, max_new = _fit(prompt_ids(tokenizer, conversation), settings.max_new_tokens, _position_limit(model))
        input_ids = torch.tensor([ids], device=model.device)
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new,
                             do_sample=False, eos_token_id=stops, pad_token_id=pad)
        text, _, n = _answer(tokenizer, out[0, len(ids):].tolist(), set(stops), pad)
        texts.append(text)
        tokens += n
    return texts, tokens, time.perf_counter() - start


def batched(model, tokenizer, conversations, settings, batch_size) -> tuple[list[str], int, float]:
    start = time.perf_counter()
    gens = generate_batch(model, tokenizer, conversations, settings, batch_size=batch_size)
    return [g.text for g in gens], sum(g.new_tokens for g in gens), time.perf_counter() - start


def against_lm_eval(checkpoint, prompts: list, max_new_tokens: int, batch_size: int, rounds: int,
                    device: str) -> bool:
    """Time heldout_samples against lm-eval's simple_evaluate (model="hf") on the same prompts, in
    rounds of alternating order (ABBA...), after a warm-up; print the ratio. True when every response
    is identical."""
    from lm_eval_agreement import (
        OFFLINE_NOTE,
        lm_eval_side,
        load_lm_eval,
        load_stepwise,
        stepwise_side,
    )

    loaded, ours_load = load_stepwise(checkpoint, device)
    lm, theirs_load = load_lm_eval(checkpoint, batch_size, device)

    def run(name: str, n: int, max_new: int):
        return stepwise_side(loaded, prompts[:n], max_new, batch_size) if name == "ours" else \
            lm_eval_side(lm, prompts[:n], max_new)

    run("ours", 2, 4), run("theirs", 2, 4)  # warm-up: lazy imports, allocator growth, kernel selection
    times = {"ours": 0.0, "theirs": 0.0}
    sides = {}
    for r in range(rounds):
        for name in (("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")):
            side = run(name, len(prompts), max_new_tokens)
            times[name] += side.eval_s
            if name in sides and sides[name].responses != side.responses:
                raise RuntimeError(f"{side.name} answered differently in round {r + 1}: greedy is not deterministic")
            sides[name] = side
    a, b = sides["ours"], sides["theirs"]
    same = sum(x == y for x, y in zip(a.responses, b.responses))
    print(f"trainer eval vs lm-eval hf: {len(prompts)} IFEval prompts, greedy, max_new_tokens {max_new_tokens}, "
          f"batch size {batch_size} on both, float32, {rounds} rounds alternating; {checkpoint}")
    print(f"  ({OFFLINE_NOTE}; model load, not timed: trainer eval {ours_load:.1f} s, lm-eval hf {theirs_load:.1f} s)")
    print(f"  trainer eval (heldout_samples):     {times['ours']:7.2f} s for {rounds} x {len(prompts)} prompts "
          f"({a.tokens} tokens a round), generated and scored")
    print(f"  lm-eval hf (simple_evaluate, hf):   {times['theirs']:7.2f} s for {rounds} x {len(prompts)} prompts, "
          f"generated and scored")
    print(f"  ratio trainer eval / lm-eval hf: {times['theirs'] / times['ours']:.2f}x (goal >= 3x)   "
          f"responses identical: {'yes' if same == len(prompts) else 'NO'} ({same}/{len(prompts)})")
    return same == len(prompts)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="bench/generation.py", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a checkpoint folder instead of the untrained demo model")
    parser.add_argument("--prompts", type=int, default=128, help="prompts from eval_prompts/demo_ifeval.jsonl (>= 32)")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--ifeval_max_new_tokens", type=int, default=32, help="the cap for the IFEval-file timing")
    parser.add_argument("--skip_ifeval", action="store_true")
    parser.add_argument("--lm_eval_prompts", type=int, default=32,
                        help="prompts for the trainer eval vs lm-eval timing (the first N of the IFEval file)")
    parser.add_argument("--lm_eval_max_new_tokens", type=int, default=64)
    parser.add_argument("--lm_eval_batch_size", type=int, default=16, help="both sides' (trainer eval's default)")
    parser.add_argument("--lm_eval_rounds", type=int, default=2, help="timed rounds per side, alternating order")
    parser.add_argument("--skip_lm_eval", action="store_true")
    parser.add_argument("--device", default="cpu")
    # Both sides get the machine's cores, as a user's run would. One-at-a-time decoding is bound by
    # per-token overhead and gains nothing from a second thread; batched decoding does. On a machine
    # busy with other work, spinning threads make both sides swing: pass --threads 1 there.
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help=f"torch threads (default {torch.get_num_threads()}, torch's default here)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.checkpoint:
        loaded = load_model(args.checkpoint, args.device)
        model, tokenizer, name = loaded.model, loaded.tokenizer, loaded.label
    else:
        model, tokenizer = demo_model(context_length=256)
        model.to(args.device)
        name = "demo Llama, untrained (no EOS: every answer is max_new_tokens long)"
    n_params = sum(p.numel() for p in model.parameters())
    prompts = load_prompts(DEMO_PROMPTS)
    prompts = (prompts * (args.prompts // len(prompts) + 1))[: args.prompts]
    conversations = [[{"role": "user", "content": p.prompt}] for p in prompts]
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    print(f"model: {name}, {n_params / 1e6:.1f}M parameters, {args.device}, {args.threads} torch threads")
    print(f"prompts: {len(conversations)} from {DEMO_PROMPTS.relative_to(ROOT)}, greedy, "
          f"max_new_tokens {args.max_new_tokens}, batch size {args.batch_size}")

    # Warm-up: first calls pay for lazy imports, allocator growth and kernel selection.
    one_at_a_time(model, tokenizer, conversations[:2], GenerationSettings(max_new_tokens=4))
    batched(model, tokenizer, conversations[:8], GenerationSettings(max_new_tokens=4), 8)

    seq_texts, seq_tokens, seq_s = one_at_a_time(model, tokenizer, conversations, settings)
    bat_texts, bat_tokens, bat_s = batched(model, tokenizer, conversations, settings, args.batch_size)
    seq_rate, bat_rate = seq_tokens / seq_s, bat_tokens / bat_s
    same = sum(a == b for a, b in zip(seq_texts, bat_texts))
    print(f"  one at a time (model.generate): {seq_tokens:6d} tokens in {seq_s:7.2f} s = {seq_rate:8.1f} tokens/s")
    print(f"  batched (generate_batch):       {bat_tokens:6d} tokens in {bat_s:7.2f} s = {bat_rate:8.1f} tokens/s")
    print(f"  ratio: {bat_rate / seq_rate:.1f}x (goal >= 6x)   outputs identical: "
          f"{'yes' if same == len(seq_texts) else 'NO'} ({same}/{len(seq_texts)})")

    if not args.skip_ifeval and IFEVAL.is_file():
        ifeval = load_prompts(IFEVAL)
        capped = GenerationSettings(max_new_tokens=args.ifeval_max_new_tokens)
        marks = []
        start = time.perf_counter()
        rows, summary = heldout_samples(model, tokenizer, ifeval, capped, batch_size=args.batch_size,
                                        on_batch=lambda done: marks.append(time.perf_counter()))
        total = time.perf_counter() - start
        generating = marks[-1] - start
        print(f"IFEval {IFEVAL.name}: {len(ifeval)} prompts generated and scored in {total:.1f} s "
              f"(generation {generating:.1f} s, scoring {total - generating:.1f} s; "
              f"max_new_tokens capped at {args.ifeval_max_new_tokens}, batch size {args.batch_size}, "
              f"{sum(r['new_tokens'] for r in rows)} tokens; prompt-level strict "
              f"{100 * summary['if_prompt_strict']:.1f} %)")

    agree = True
    if not args.skip_lm_eval:
        from lm_eval_agreement import default_prompts

        from trainer.inference.gguf import smollm2_gguf

        checkpoint = args.checkpoint or smollm2_gguf()
        if checkpoint is None:
            print("trainer eval vs lm-eval hf: skipped (no --checkpoint and SmolLM2's GGUF is not installed)")
        else:
            chosen = [p for p in load_prompts(default_prompts()) if p.instruction_id_list][: args.lm_eval_prompts]
            agree = against_lm_eval(checkpoint, chosen, args.lm_eval_max_new_tokens, args.lm_eval_batch_size,
                                    args.lm_eval_rounds, args.device)
    return 0 if same == len(seq_texts) and agree else 1


if __name__ == "__main__":
    sys.exit(main())
