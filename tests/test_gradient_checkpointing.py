"""--gradient_checkpointing: the decoder layers really recompute in backward, and training gives the
same losses and weights as without it (the tiny demo model, one process, a few real steps)."""

from __future__ import annotations

import torch

from tests.support import one_thread
from trainer.cli.options import parse_config
from trainer.training.distributed import decoder_layers
from trainer.training.loop import step_batches, train_step
from trainer.training.setup import setup

STEPS, ACCUM = 3, 2


def train(tmp_path, checkpointing: bool) -> tuple[list[float], int, dict[str, torch.Tensor]]:
    """(per-step losses, forward calls of the first decoder layer's MLP, weights after). Counted by
    wrapping its forward: module hooks do not run again when the checkpoint recomputes."""
    flags = ["--gradient_checkpointing"] if checkpointing else []
    cfg = parse_config(["--demo_records", "120", "--context_length", "64", "--mini_batch_size", "4",
                        "--total_batch_size", str(4 * 64 * ACCUM), "--max_steps", str(STEPS), "--output_dir", str(tmp_path),
                        "--run_name", f"gc-{checkpointing}", "--use_tensorboard", "false", "--progress", "false",
                        "--eval_prompts", "none", "--learning_rate", "3e-3", *flags])
    with one_thread():
        run = setup(cfg)
        run.reporter.enabled = False
        calls = []
        mlp = decoder_layers(run.raw_model)[0].mlp
        forward = mlp.forward

        def counted(*args, **kwargs):
            calls.append(1)
            return forward(*args, **kwargs)

        mlp.forward = counted
        cache: dict = {}
        losses = [train_step(run, step_batches(run, step, cache))[0] for step in range(STEPS)]
    return losses, len(calls), {k: v.detach().clone() for k, v in run.raw_model.state_dict().items()}


def test_gradient_checkpointing_recomputes_and_changes_nothing_else(tmp_path):
    plain_losses, plain_calls, plain_weights = train(tmp_path, checkpointing=False)
    gc_losses, gc_calls, gc_weights = train(tmp_path, checkpointing=True)
    assert plain_calls == STEPS * ACCUM
    assert gc_calls == 2 * STEPS * ACCUM, "each layer runs again in the backward pass"
    assert all(abs(a - b) < 1e-5 for a, b in zip(plain_losses, gc_losses)), (plain_losses, gc_losses)
    assert plain_losses[-1] < plain_losses[0]
    for name, w in plain_weights.items():
        torch.testing.assert_close(gc_weights[name], w, atol=1e-5, rtol=1e-5, msg=name)
