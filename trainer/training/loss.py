"""The training loss without the full logits: the decoder runs as usual, but only the hidden states
at supervised positions (shifted label != -100) reach the LM head, and those go through it in chunks
of rows whose logits are computed, used and freed, so no (batch x context x vocabulary) tensor exists.

The value is exactly Hugging Face's causal-LM loss (the sum of token cross-entropies over
num_items_in_batch, or their mean without it), and so are the gradients, up to float rounding.
Models for which that is not guaranteed run their own forward instead (CausalLMLoss.fallback says why).
"""

from __future__ import annotations

import inspect
import os

import torch
from torch import nn

IGNORE = -100
# A chunk's fp32 logits hold about this many floats (128 MiB): big enough for an efficient GEMM,
# small next to the (batch x context x vocabulary) tensor it replaces.
CHUNK_FLOATS = 1 << 25
FORCE_HF = "STEPWISE_HF_LOSS"
"""Set to 1 to run the model's own forward (to compare against it)."""


def _body(forward) -> str | None:
    try:
        return inspect.getsource(forward).split('"""')[-1]
    except (OSError, TypeError):
        return None


def _reference_body() -> str | None:
    from transformers import LlamaForCausalLM

    return _body(LlamaForCausalLM.forward)


def fallback_reason(lm: nn.Module) -> str | None:
    """Why the chunked loss would not be exactly the model's own (None when it is)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    if os.environ.get(FORCE_HF) == "1":
        return f"{FORCE_HF}=1"
    config = getattr(lm, "config", None)
    if getattr(config, "final_logit_softcapping", None):
        return "the model caps its logits (final_logit_softcapping)"
    decoder = getattr(lm, "model", None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if not hasattr(lm, "get_decoder") or not isinstance(decoder, nn.Module) or type(head) is not nn.Linear:
        return "the model has no plain decoder and linear LM head"
    if getattr(lm, "loss_function", None) is not ForCausalLMLoss:
        return "the model has its own loss function"
    # Many models scale, cap or otherwise change the logits in their forward (Cohere, Granite, Gemma 2,
    # MoE auxiliary losses...). Only a forward that is literally Llama's (decoder, LM head, the standard
    # loss) is replaced; every other one keeps its own.
    body = _body(type(lm).forward)
    if body is None or body != _reference_body():
        return f"{type(lm).__name__}'s forward is not the plain decoder + LM head"
    return None


def chunk_rows(vocab_size: int) -> int:
    """Rows of hidden states per chunk of the LM head for this vocabulary."""
    return max(64, CHUNK_FLOATS // vocab_size)


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropies of (hidden @ weight.T + bias) against targets, chunk by chunk. The
    gradients are computed in the forward, one chunk at a time (as Liger's fused linear
    cross-entropy does), so the backward only scales them and no chunk's logits are kept or recomputed."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, dtype: torch.dtype):
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if want_h else None
        # Accumulators in fp32 at least: each chunk's contribution is added at full precision.
        acc = torch.promote_types(dtype, torch.float32)
        grad_w = torch.zeros_like(weight, dtype=acc) if want_w else None
        grad_b = torch.zeros_like(bias, dtype=acc) if want_b else None
        w = weight.to(dtype)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start, h, t, exps, sums in _chunks(hidden, w, bias, targets, chunk, dtype, total):
                probs = exps.div_(sums)  # in place: the chunk's one buffer becomes its softmax
                # d(loss)/d(logits) = softmax - one_hot(target), cast to the compute dtype as autograd would.
                probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                g = probs.to(dtype)
                if want_h:
                    grad_h[start:start + h.shape[0]] = g @ w
                if want_w and g.dtype == grad_w.dtype:
                    grad_w.addmm_(g.t(), h)  # in place: no (vocabulary x hidden) temporary per chunk
                elif want_w:
                    grad_w += g.t() @ h
                if want_b:
                    grad_b += g.sum(0, dtype=grad_b.dtype)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        dh, dw, db = ctx.dtypes
        scale = lambda g, dt: (g * grad_out).to(dt) if g is not None else None  # noqa: E731
        return scale(grad_h, dh), scale(grad_w, dw), scale(grad_b, db), None, None, None


def _chunks(hidden, w, bias, targets, chunk: int, dtype: torch.dtype, total: torch.Tensor):
    """(start, hidden rows in dtype, targets, exp(logits - max) in fp32, their row sums) per chunk of
    rows, adding each chunk's summed cross-entropy to total. The logits are upcast to fp32 before the
    softmax, as Hugging Face's loss does; one fp32 buffer serves every chunk (a fresh one each time
    would be page-faulted in again), overwritten in place."""
    b = bias.to(dtype) if bias is not None else None
    acc = torch.promote_types(dtype, torch.float32)  # fp32 at least (fp64 stays fp64)
    buffer = torch.empty((min(chunk, hidden.shape[0]), w.shape[0]), dtype=acc, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start:start + chunk].to(dtype), targets[start:start + chunk]
        logits = buffer[: h.shape[0]]
        if dtype == acc:
            torch.mm(h, w.t(), out=logits) if b is None else torch.addmm(b, h, w.t(), out=logits)
        else:
            logits.copy_(h @ w.t() if b is None else torch.addmm(b, h, w.t()))
        top = logits.amax(dim=1, keepdim=True)
        picked = logits.gather(1, t[:, None]) - top
        sums = logits.sub_(top).exp_().sum(dim=1, keepdim=True)
        total += (sums.log() - picked).sum()  # log-sum-exp minus the target's logit, both shifted by top
        yield start, h, t, logits, sums


@torch.compiler.disable  # data-dependent shapes and a Python loop: runs eagerly, the decoder compiles
def supervised_loss_sum(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Linear, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses, supervised tokens) of hidden states (B, T, H) against labels (B, T):
    position t predicts labels[:, t + 1]; only positions whose next label is not -100 reach the head."""
    rows, cols = torch.nonzero(labels[:, 1:] != IGNORE, as_tuple=True)
    h = hidden[rows, cols]
    targets = labels[rows, cols + 1]
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else head.weight.dtype
    grads = torch.is_grad_enabled() and (h.requires_grad or head.weight.requires_grad
                                         or (head.bias is not None and head.bias.requires_grad))
    if grads:
        total = _LinearCrossEntropy.apply(h, head.weight, head.bias, targets, chunk, dtype)
    else:
        total = torch.zeros((), dtype=torch.promote_types(dtype, torch.float32), device=hidden.device)
        with torch.autocast(device, enabled=False):
            for _ in _chunks(h, head.weight.to(dtype), head.bias, targets, chunk, dtype, total):
                pass
    return total, torch.tensor(targets.shape[0], device=hidden.device)


class CausalLMLoss(nn.Module):
    """A causal LM (a Hugging Face model, LoRA layers injected or not, or its peft wrapper) whose
    forward returns the training loss, computed without the full logits tensor where that is exact."""

    def __init__(self, lm: nn.Module, chunk_size: int | None = None):
        super().__init__()
        self.lm = lm
        self.fallback = fallback_reason(self.base_model())
        """Why the model's own forward runs instead (None: the chunked loss runs)."""
        self.chunk_size = chunk_size or chunk_rows(self.base_model().config.vocab_size)

    def base_model(self) -> nn.Module:
        """The Hugging Face model itself (peft injects LoRA layers into its modules in place)."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, num_items_in_batch: torch.Tensor | int | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.fallback is not None:
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False,
                           position_ids=position_ids, num_items_in_batch=num_items_in_batch).loss
        base = self.base_model()
        out = base.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False)
        total, count = supervised_loss_sum(out.last_hidden_state, labels, base.get_output_embeddings(),
                                           self.chunk_size)
        if num_items_in_batch is None:
            return total / count  # Hugging Face's mean reduction (NaN with no supervised token, as there)
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
