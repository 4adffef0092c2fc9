"""The MFU arithmetic of bench/train_throughput.py: a Llama's training FLOPs per token, and the matmul
peak of this machine measured at that model's own GEMM shapes (fp32 or bf16, forward and backward forms)."""

from __future__ import annotations

import time

import torch


def linear_shapes(config) -> list[tuple[int, int, int]]:
    """(in, out, count) of every linear layer of a Llama config: the blocks' projections and the LM head."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return [(h, q, 2 * layers),  # q_proj and o_proj (o is q's transpose shape, same FLOPs)
            (h, kv, 2 * layers),  # k_proj, v_proj
            (h, inter, 2 * layers),  # gate_proj, up_proj
            (inter, h, layers),  # down_proj
            (h, config.vocab_size, 1)]  # lm_head


def gemm_peak(config, tokens: int, repeats: int = 3, dtype: torch.dtype = torch.float32,
              device: str = "cpu") -> float:
    """FLOP/s of this model's GEMMs on this machine, now: each linear layer's forward (X W^T) and backward
    (dY W, dY^T X) matmul at `tokens` rows, the best of `repeats` each, combined as total FLOPs over total
    time weighted by how often the model runs each shape (so the head counts once, a block shape per layer),
    in `dtype` (bf16 is what autocast runs the matmuls in), on `device` (a GPU's kernels are waited for)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    flops = seconds = 0.0
    for n_in, n_out, count in linear_shapes(config):
        x, w, dy = (torch.randn(*shape, dtype=dtype, device=device)
                    for shape in ((tokens, n_in), (n_out, n_in), (tokens, n_out)))
        for form in (lambda: torch.nn.functional.linear(x, w), lambda: dy @ w, lambda: dy.t() @ x):
            best = float("inf")  # the best call, not the first: that one also picks and warms its kernel
            for _ in range(repeats):
                sync()
                start = time.perf_counter()
                form()
                sync()
                best = min(best, time.perf_counter() - start)
            flops += 2 * tokens * n_in * n_out * count
            seconds += best * count
    return flops / seconds


def matmul_params(model) -> int:
    """Parameters that are multiplied per token: all but the input embedding, plus the LM head (counted
    once even when it is tied to the embedding, as it is in both bench shapes)."""
    total = sum(p.numel() for p in model.parameters())  # a tied head is the embedding's own Parameter
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return total - embed.numel() - (0 if head is embed else head.numel()) + head.numel()


def flops_per_token(model, attended: float) -> float:
    """Training FLOPs per real token: 6 x matmul_params (forward 2, backward 4) plus attention's scores
    and weighted sum, 12 x layers x hidden x keys attended (PaLM, appendix B: each token counted against
    its whole example, the non-causal convention); `attended` is the token-weighted mean example length."""
    cfg = model.config
    return 6 * matmul_params(model) + 12 * cfg.num_hidden_layers * cfg.hidden_size * attended
