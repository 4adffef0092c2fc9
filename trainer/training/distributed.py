"""Several processes: the process group, the model each step runs (plain, DDP or FSDP2), and what
changes when parameters are sharded (gradient sync, gathering a checkpoint, restoring its optimizer).

Under `--fsdp` (torchrun, world > 1) every decoder layer and then the root are `fully_shard`ed, so each
rank holds 1/world of the parameters, gradients and optimizer state. A checkpoint is gathered: every
rank takes part in the all-gathers, rank 0 receives the full state on the CPU and writes the same
Hugging Face folder and optimizer files as a one-process run (so a checkpoint resumes under any world
size, and loads anywhere). On resume rank 0 alone reads the optimizer file and streams it to the
others tensor by tensor (broadcast_from_rank0), so no rank but 0 ever holds the whole state.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from trainer.core.config import Config
from trainer.core.errors import StepwiseError
from trainer.core.files import read_json
from trainer.training.checkpoint import read_optimizer_state

FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; the process group when world > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def check_flags(cfg: Config, world: int) -> list[str]:
    """Refuse what cannot run (one-line errors, before any data loads); notes to print otherwise."""
    if not cfg.model.fsdp:
        return []
    if cfg.model.compile:
        raise StepwiseError("--fsdp with --compile is not supported (the sharded model is not compiled); "
                            "drop --compile or --fsdp")
    if world == 1:
        # As Hugging Face Trainer, one process still trains; with nothing to shard it trains unsharded.
        return ["--fsdp: one process, nothing to shard: training unsharded "
                "(torchrun --nproc_per_node N -m trainer train --fsdp ... shards over N processes)"]
    return [f"--fsdp: parameters, gradients and optimizer state sharded over {world} processes (FSDP2)"]


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def wrap_model(model: torch.nn.Module, step: torch.nn.Module, cfg: Config, device: torch.device,
               world: int) -> torch.nn.Module:
    """What the step runs: `step` (the loss module over `model`) with `model` sharded in place under
    --fsdp, or `step` compiled and/or in DDP. Gradient checkpointing is switched on first, so FSDP
    shards the checkpointed layers."""
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.model.fsdp and world > 1:
        shard(model, device, world)
        return step
    if cfg.model.compile:
        step = torch.compile(step)
    if world > 1:
        step = DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)
    return step


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer in backward (transformers 5's activation_checkpointing_enable; the
    non-reentrant torch checkpoint, which works under DDP, FSDP2 and with inputs that need no grad)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise StepwiseError(f"--gradient_checkpointing: {type(model).__name__} does not support it")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP shards one by one: the classes transformers never splits across devices
    (`_no_split_modules`, what accelerate's FSDP auto-wrap uses)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def shard(model: torch.nn.Module, device: torch.device, world: int) -> None:
    """FSDP2 in place: each decoder layer is one all-gather / reduce-scatter group, the root (embeddings,
    final norm, LM head) another; parameters become dim-0 sharded DTensors."""
    from torch.distributed.device_mesh import init_device_mesh

    layers = decoder_layers(model)
    if not layers:
        raise StepwiseError(f"--fsdp: {type(model).__name__} names no decoder layer class (_no_split_modules)")
    mesh = init_device_mesh(device.type, (world,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


@contextmanager
def grad_sync(model: torch.nn.Module, sync: bool) -> Iterator[None]:
    """Around one micro-batch's forward and backward: without sync (every micro-batch but a step's last)
    gradients only accumulate locally; DDP's no_sync(), FSDP2's set_requires_gradient_sync(False)."""
    if sync:
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


# --- checkpoints of a sharded model --------------------------------------------------------------

def gathered(model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> tuple:
    """(model, optimizer or its state dict) that rank 0 saves and generates with. Unsharded: the run's
    own. Under FSDP every rank must call it (the gathers are collectives); rank 0 gets a plain CPU copy
    of the model and the full optimizer state in the one-process layout, the other ranks (None, {})."""
    if not is_sharded(model):
        return model, optimizer
    state = get_model_state_dict(model, options=FULL_ON_RANK0)
    if optimizer.state:
        optim = get_optimizer_state_dict(model, optimizer, options=FULL_ON_RANK0)
    else:  # nothing stepped yet (every step so far skipped): DCP would initialise the state with a step
        optim = optimizer.state_dict()
    if rank != 0:
        return None, {}
    return plain_copy(model, state), by_index(optim, param_names(model, optimizer))


def plain_copy(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An unsharded model of the same class holding the gathered `state`, built without initialising
    weights (on the meta device, then the state's tensors assigned)."""
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        copy = cls(model.config)
    copy.load_state_dict(state, assign=True)
    # Non-persistent buffers (rotary frequencies) are in no state dict: take the live model's (never sharded).
    live = dict(model.named_buffers())
    for name, buf in list(copy.named_buffers()):
        if buf.is_meta:
            owner, _, leaf = name.rpartition(".")
            copy.get_submodule(owner)._buffers[leaf] = live[name].detach().to("cpu", copy=True)
    copy.tie_weights()
    copy.generation_config = model.generation_config
    return copy.eval()


def param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order: index i of a one-process optimizer state dict."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def by_index(state: dict, names: list[str]) -> dict:
    """A state dict keyed by parameter name (torch.distributed.checkpoint's) keyed by index instead."""
    index = {n: i for i, n in enumerate(names)}
    at = index.get  # a key that is already an index (a state dict taken before any step) stays as it is
    return {"state": {at(k, k): v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [at(p, p) for p in g["params"]]} for g in state["param_groups"]]}


def by_name(state: dict, names: list[str]) -> dict:
    """The inverse of by_index."""
    return {"state": {names[int(k)]: v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[int(p)] for p in g["params"]]} for g in state["param_groups"]]}


def optimizer_loader(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     rank: int) -> Callable[[Path], None] | None:
    """What restores the optimizer from a checkpoint under FSDP (None: load it as one process does).
    Rank 0 reads the full state and broadcasts it tensor by tensor; each rank keeps its shards."""
    if not is_sharded(model):
        return None

    def load(folder: Path) -> None:
        if not has_optimizer_state(folder):  # every rank can tell (a file header), and loads the groups alone
            optimizer.load_state_dict(read_optimizer_state(folder))
            return
        full = by_name(read_optimizer_state(folder), param_names(model, optimizer)) if rank == 0 else {}
        set_optimizer_state_dict(model, optimizer, full,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))

    return load


def has_optimizer_state(folder: Path) -> bool:
    """Whether the checkpoint's optimizer has per-parameter state (none before the first applied step),
    read from the files' headers only."""
    from safetensors import safe_open

    with safe_open(folder / "optimizer.safetensors", framework="pt") as fh:
        tensors = bool(list(fh.keys()))
    return tensors or bool(read_json(folder / "optimizer.json")["scalars"])
