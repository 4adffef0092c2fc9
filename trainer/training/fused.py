"""Leaner activations for training: a decoder's SwiGLU MLP and RMSNorm, each one autograd function that
keeps fewer tensors for the backward and recomputes the cheap elementwise rest there.

A Llama-style MLP, down(silu(gate(x)) * up(x)), keeps four (tokens x intermediate) tensors per layer
under plain autograd: gate(x) for silu's backward, silu's output and up(x) for the product's, the
product for down's. `_SwiGLUDown` keeps gate(x) and up(x) and recomputes the other two (two elementwise
passes) in the backward: half of the MLP's activation memory, no extra matmul. An RMSNorm keeps its
input and the normalised input (for the weight's gradient); `_RMSNorm` keeps the input and the
per-row 1/rms only. The projections after a norm (q, k and v; gate and up) save its output for their
weight gradients: `_NormOutputs`, saved-tensor hooks over the decoder stack's forward, keeps the norm's
input in its place and recomputes the output in the backward (the same ops: the same bits).

The values are the plain modules' and the gradients equal theirs up to float rounding (tests/test_fused.py
compares loss and every gradient to 1e-5 in fp32). Only modules whose forward is literally Llama's
are replaced (Qwen2, Mistral and SmolLM2's share it); any other, a LoRA-wrapped projection, a bias or
another activation keeps its own forward.

With grouped-query attention (SmolLM2: 9 query heads over 3 key/value heads), transformers repeats each
key/value head for its query heads before SDPA whenever there is a padding mask, except on CUDA where
it would lose the flash kernel; and autograd keeps the repeated copies. On the CPU, SDPA's own grouped
path takes the mask and gives the same values, so `share_kv_heads` turns it on there, through
transformers' own switch: the attention keeps 1/3 of SmolLM2's key/value activations.

STEPWISE_PLAIN_LAYERS=1 leaves every module and the attention as they are.
"""

from __future__ import annotations

import functools
import inspect
import os
import types
import weakref

import torch
import torch.nn.functional as F
from torch import nn

PLAIN = "STEPWISE_PLAIN_LAYERS"
"""Set to 1 to train with the model's own MLP, norm and attention forwards (to compare against them)."""

GQA = "TRANSFORMERS_SDPA_FORCE_GQA"
"""transformers' switch (integrations/sdpa_attention.py) for SDPA's grouped path under a mask."""


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype


class _SwiGLUDown(torch.autograd.Function):
    """down(silu(gate) * up) keeping only gate and up (and the weight) for the backward."""

    @staticmethod
    def forward(ctx, gate, up, weight, dtype: torch.dtype):
        with torch.autocast(gate.device.type, enabled=False):
            out = F.linear(F.silu(gate.to(dtype)) * up.to(dtype), weight.to(dtype))
        ctx.save_for_backward(gate, up, weight)
        ctx.dtype = dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        gate, up, weight = ctx.saved_tensors
        dtype = ctx.dtype
        with torch.autocast(grad.device.type, enabled=False):
            g, u, grad = gate.to(dtype), up.to(dtype), grad.to(dtype)
            act = F.silu(g)
            d_product = grad @ weight.to(dtype)
            d_weight = None
            if ctx.needs_input_grad[2]:  # as Linear's backward: grad^T @ its input, the product
                product = act * u
                d_weight = (grad.reshape(-1, grad.shape[-1]).t() @ product.reshape(-1, product.shape[-1]))
                d_weight = d_weight.to(weight.dtype)
                del product
            d_up = (d_product * act).to(up.dtype)
            del act
            # silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g))), in fp32 at least as torch's kernel does.
            e = torch.promote_types(dtype, torch.float32)
            gf, sig = g.to(e), torch.sigmoid(g.to(e))
            d_gate = (d_product.to(e) * u.to(e) * sig * (1 + gf * (1 - sig))).to(gate.dtype)
        return d_gate, d_up, d_weight, None


def _fused_mlp_forward(self, x):
    gate, up = self.gate_proj(x), self.up_proj(x)
    # Under autocast the product and down's matmul run in its dtype, as down_proj's autocast would.
    return _SwiGLUDown.apply(gate, up, self.down_proj.weight, _compute_dtype(gate))


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * x / rms(x), 1/rms(x)), computed as LlamaRMSNorm computes it."""
    xf = x.to(torch.float32)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (xf * rstd).to(x.dtype), rstd


class _RMSNorm(torch.autograd.Function):
    """weight * (x / rms(x)), in fp32 as Llama's norm computes it, keeping x and 1/rms for the backward."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        out, rstd = _rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        e = torch.promote_types(grad.dtype, torch.float32)
        normed = x.to(torch.float32) * rstd
        d_weight = None
        if ctx.needs_input_grad[1]:
            d_weight = (grad * normed.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0, dtype=e).to(weight.dtype)
        d_normed = grad.to(e) * weight.to(e)
        d_x = rstd * (d_normed - normed * (d_normed * normed).mean(-1, keepdim=True))
        return d_x.to(x.dtype), d_weight, None


def _fused_norm_forward(self, hidden_states):
    out = _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)
    if _active and out.requires_grad and not torch.compiler.is_compiling():
        _active[-1].remember(out, hidden_states, self.weight, self.variance_epsilon)
    return out


class _Recompute:
    """What autograd keeps of a norm's output saved for a backward: the norm's input (kept by the norm
    anyway), its weight and the view's layout."""

    __slots__ = ("x", "weight", "eps", "size", "stride", "offset")

    def __init__(self, x, weight, eps, view: torch.Tensor):
        self.x, self.weight, self.eps = x, weight, eps
        self.size, self.stride, self.offset = view.size(), view.stride(), view.storage_offset()

    def values(self, unpack) -> torch.Tensor:
        out, _ = _rms_norm(unpack(self.x), self.weight, self.eps)  # the forward's ops: the same bits
        return out.as_strided(self.size, self.stride, self.offset)


class _Outer:
    """A tensor packed by the saved-tensor hooks that were on when the forward began (a caller's own)."""

    __slots__ = ("packed",)

    def __init__(self, packed):
        self.packed = packed


class _NormOutputs:
    """Saved-tensor hooks for one forward of a decoder stack. The projections after each norm (q, k and
    v; gate and up) save the norm's output for their weight gradients: a (tokens x hidden) tensor per
    norm that the norm's own input and 1/rms already determine. Saved here as a `_Recompute`, it is
    computed again in the backward (two elementwise passes) and never kept. Any other tensor goes to
    the hooks that were on before (a caller's), or is kept as autograd keeps it."""

    def __init__(self):
        self.outputs: dict[int, tuple[weakref.ref, torch.Tensor, torch.Tensor, float]] = {}
        top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
        self.outer = top(True) if top is not None else None

    def remember(self, out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
        if out.is_contiguous() and out.storage_offset() == 0:
            self.outputs[out.untyped_storage().data_ptr()] = (weakref.ref(out), x, weight, eps)

    def _outer(self, t):
        return t if self.outer is None else _Outer(self.outer[0](t))

    def pack(self, t: torch.Tensor):
        entry = self.outputs.get(t.untyped_storage().data_ptr())
        if entry is not None:
            ref, x, weight, eps = entry
            out = ref()  # alive while the forward holds it, so the address is still the output's
            if out is not None and t.dtype == out.dtype and t.device == out.device:
                return _Recompute(self._outer(x), weight, eps, t)
        return self._outer(t)

    def unpack(self, packed):
        if isinstance(packed, _Recompute):
            return packed.values(self.unpack)
        if isinstance(packed, _Outer):
            return self.outer[1](packed.packed)
        return packed


_active: list[_NormOutputs] = []
"""The hooks of the forward under way (at most one: a stack inside another shares the outer's)."""


def _wrap_stack_forward(forward):
    """forward of a module whose direct children include fused norms, under `_NormOutputs`' hooks while
    gradients are recorded (not while compiling: the compiled graph keeps what it keeps)."""

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if (_active or not torch.is_grad_enabled() or torch.compiler.is_compiling()
                or not torch._C._autograd._saved_tensors_hooks_is_enabled()):
            return forward(*args, **kwargs)
        hooks = _NormOutputs()
        _active.append(hooks)
        try:
            with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
                return forward(*args, **kwargs)
        finally:
            _active.pop()

    return run


def _source(forward) -> str | None:
    try:
        return inspect.getsource(forward)
    except (OSError, TypeError):
        return None


def _is_plain_mlp(m: nn.Module) -> bool:
    from transformers.activations import SiLUActivation
    from transformers.models.llama.modeling_llama import LlamaMLP

    linears = [getattr(m, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    return (all(type(p) is nn.Linear and p.bias is None for p in linears)
            and type(getattr(m, "act_fn", None)) in (SiLUActivation, nn.SiLU)
            and _source(type(m).forward) == _source(LlamaMLP.forward))


def _is_plain_norm(m: nn.Module) -> bool:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return (isinstance(getattr(m, "weight", None), nn.Parameter) and hasattr(m, "variance_epsilon")
            and _source(type(m).forward) == _source(LlamaRMSNorm.forward))


def fuse_layers(model: nn.Module) -> dict[str, int]:
    """Give every plain Llama-style MLP and RMSNorm of model the fused forward, in place (the weights and
    the state dict are untouched). Returns how many of each were replaced."""
    counts = {"mlp": 0, "rmsnorm": 0}
    if os.environ.get(PLAIN) == "1":
        return counts
    drop_hub_kernels(model)
    fused_norms = []
    for m in model.modules():
        if "forward" in vars(m):  # already replaced (or patched by someone else): left as it is
            continue
        if _is_plain_mlp(m):
            m.forward = types.MethodType(_fused_mlp_forward, m)
            counts["mlp"] += 1
        elif _is_plain_norm(m):
            m.forward = types.MethodType(_fused_norm_forward, m)
            fused_norms.append(m)
            counts["rmsnorm"] += 1
    _hook_stacks(model, fused_norms)
    return counts


def drop_hub_kernels(model: nn.Module) -> None:
    """Turn off transformers' hub kernels on every model in `model` (from_pretrained turns them on by
    default where the `kernels` package is installed, as transformers 5.2x requires). A kernelized
    model kernelizes again on every train()/eval() that changes mode, setting each decorated module's
    forward (LlamaRMSNorm's among them) back to its class's or a hub kernel's: the fused forwards would
    be gone from the first training step of a loaded model, and the run would differ from one built
    from a config. Off, the modules run their torch forwards (what kernelize falls back to on a CPU)."""
    from transformers import PreTrainedModel

    for m in model.modules():
        if isinstance(m, PreTrainedModel) and getattr(m, "use_kernels", False):
            m.use_kernels = False  # transformers' own reset: every decorated module back to torch


def _hook_stacks(model: nn.Module, norms: list[nn.Module]) -> None:
    """Run under `_NormOutputs` the outermost module that holds fused norms as direct children (Llama's
    LlamaModel: its final norm), so its hooks cover every decoder layer. A layer that gradient
    checkpointing may wrap is never the one: checkpointing's own hooks must be the innermost there."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    ids = {id(n) for n in norms}
    for m in model.modules():  # parents before children
        if (any(id(c) in ids for c in m.children()) and not isinstance(m, GradientCheckpointingLayer)
                and "forward" not in vars(m)):
            m.forward = _wrap_stack_forward(m.forward)
            return


def share_kv_heads(device: torch.device) -> bool:
    """On the CPU, have SDPA read the shared key/value heads of grouped-query attention directly rather
    than repeated copies (same values; tests/test_fused.py). Whether it is on; a user's own setting of
    the switch is kept."""
    if device.type == "cpu" and os.environ.get(PLAIN) != "1":
        os.environ.setdefault(GQA, "1")
    return os.environ.get(GQA) == "1"
