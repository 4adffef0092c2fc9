"""What a run is, built once before it trains: processes, data, model, optimizer, schedule, held-out
prompts. Everything here stays fixed while the loop (trainer.training.loop) runs."""

from __future__ import annotations

import math
import os
import random
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from trainer.core import catalog
from trainer.core.config import Config
from trainer.core.errors import StepwiseError
from trainer.evals.contamination import check_prompts_against_records, warn
from trainer.evals.prompts import HeldoutPrompt, load_prompts
from trainer.inference.gguf import packaged_file
from trainer.inference.loading import check_weights
from trainer.training.batching import (
    collate,
    collate_packed,
    micro_batches,
    padding_efficiency,
    steps_per_epoch,
    tokenize,
)
from trainer.training.checkpoint import clean_leftovers, weights_finite
from trainer.training.data import load_train_val
from trainer.training.distributed import (
    check_flags,
    init_distributed,
    is_sharded,
    wrap_model,
)
from trainer.training.fused import fuse_layers, share_kv_heads
from trainer.training.loss import CausalLMLoss
from trainer.training.models import (
    apply_lora,
    build_demo_model,
    build_demo_tokenizer,
    check_template,
    demo_texts,
    load_lora_checkpoint,
    load_pretrained,
    load_pretrained_tokenizer,
)
from trainer.training.progress import Reporter


@dataclass
class Run:
    """Everything `fit` needs, built once by `setup` and not reassigned while it trains."""

    cfg: Config
    run_dir: Path
    device: torch.device
    rank: int
    world: int
    model: torch.nn.Module
    """What the step runs: loss_model, compiled and/or wrapped in DDP; called with a batch, it returns the
    loss (under FSDP, loss_model over the model sharded in place)."""
    raw_model: torch.nn.Module
    """The model itself, for saving, clipping and generation (sharded in place under FSDP: saving and
    generation then use a copy gathered on rank 0, trainer.training.distributed.gathered)."""
    tokenizer: object
    train: list[dict]
    val_batches: list[dict]
    """This process's share of the validation batches, collated once at setup."""
    val_examples: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total_steps: int
    steps_per_epoch: int
    reporter: Reporter
    resume_from: Path | None = None
    """The checkpoint this run continues from (--resume), None for a fresh start."""
    heldout: list[HeldoutPrompt] = field(default_factory=list)
    data_stats: dict = field(default_factory=dict)
    """Counts for training_metrics.json's `data` (examples, tokens, steps an epoch, ...)."""
    loss_model: torch.nn.Module | None = None
    """raw_model in the loss wrapper (trainer.training.loss), neither compiled nor in DDP: validation runs it."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def micro_per_step(self) -> int:
        return self.cfg.grad_accum_steps * self.world


def resolve_run_dir(cfg: Config) -> Path:
    out = Path(cfg.run.output_dir)
    if cfg.run.run_name:
        return out / cfg.run.run_name
    if cfg.run.resume:
        return catalog.newest_run(out).path
    return out / f"{cfg.config_name}-{datetime.now():%Y%m%d-%H%M%S}"


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    # Biases and norm weights (1-D) are not decayed, as in Hugging Face Trainer and nanoGPT.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel (CPU and CUDA) does the whole update in one pass over each tensor.
    return torch.optim.AdamW(groups, lr=cfg.optim.learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=True)


def load_data(cfg: Config, reporter: Reporter) -> tuple[list[dict], list[dict]]:
    train_records, val_records, reports = load_train_val(
        cfg.data.dataset, cfg.data.val_dataset, cfg.data.val_fraction, cfg.optim.seed, cfg.data.strict,
        cfg.data.demo_records)
    for report in reports:
        reporter.info(report.summary())
    return train_records, val_records


def load_tokenizer_and_model(cfg: Config, train_records: list[dict], resume_from: Path | None = None,
                             with_model: bool = True):
    """(tokenizer, model): from the checkpoint being resumed, the demo preset, or --pretrained_model.
    With with_model=False only the tokenizer is loaded (the planner needs lengths, not weights)."""
    if resume_from is not None and cfg.model.lora_r:
        tokenizer, model = load_lora_checkpoint(resume_from, cfg.model.pretrained_model)
    elif resume_from is not None:
        tokenizer, model = load_pretrained(str(resume_from))
    elif cfg.model.pretrained_model == "demo":
        tokenizer = build_demo_tokenizer(demo_texts(train_records))
        model = build_demo_model(tokenizer, cfg.data.context_length, cfg.optim.seed) if with_model else None
    elif with_model:
        tokenizer, model = load_pretrained(cfg.model.pretrained_model)
    else:
        tokenizer, model = load_pretrained_tokenizer(cfg.model.pretrained_model), None
    check_template(tokenizer)
    if model is not None and cfg.model.lora_r and resume_from is None:
        model = apply_lora(model, cfg.model, cfg.model.pretrained_model)
    return tokenizer, model


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_paths(cfg: Config) -> None:
    """Mistakes in paths, found before minutes of data loading rather than after."""
    out = Path(cfg.run.output_dir)
    if out.exists() and not out.is_dir():
        raise StepwiseError(f"--output_dir {out}: is a file, not a folder")
    probe = _nearest_existing(out.absolute())
    if not probe.is_dir():
        raise StepwiseError(f"--output_dir {out}: {probe} is a file, not a folder")
    try:  # permission bits do not tell root (or a read-only mount) apart: try a real write
        fd, name = tempfile.mkstemp(prefix=".stepwise-write-test-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        raise StepwiseError(f"--output_dir {out}: cannot write in {probe} ({err.strerror})") from None
    if cfg.eval.eval_prompts and not Path(cfg.eval.eval_prompts).is_file():
        raise StepwiseError(f"--eval_prompts {cfg.eval.eval_prompts}: no such file")
    model = packaged_file(cfg.model.pretrained_model)
    if cfg.model.lora_r and model == "demo":
        raise StepwiseError("--lora_r needs --pretrained_model: the demo model starts from random weights, so an "
                            "adapter on it has no base to load later (train it fully, or give a pretrained model)")
    if model != "demo" and model.startswith(("/", ".", "~")) and not Path(model).expanduser().exists():
        raise StepwiseError(f"--pretrained_model {model}: no such {'file' if model.endswith('.gguf') else 'folder'}")
    if model != "demo" and Path(model).expanduser().is_dir() and not cfg.run.resume:
        check_weights(Path(model).expanduser(), f"--pretrained_model {model}")  # pickled or damaged weights


def resume_checkpoint(run_dir: Path, reporter: Reporter) -> Path:
    """The newest complete checkpoint with finite weights (older Stepwise versions could write one
    with NaN weights; it is skipped, and said so)."""
    steps = catalog.list_steps(run_dir)
    if not steps:
        raise StepwiseError(f"--resume: {run_dir} has no complete checkpoint to resume from")
    for step in reversed(steps):
        folder = run_dir / catalog.step_dir_name(step)
        if weights_finite(folder):
            return folder
        reporter.info(f"skipping {folder}: its weights are not finite")
    raise StepwiseError(f"--resume: no checkpoint of {run_dir} has finite weights; start a new --run_name")


def setup(cfg: Config, reporter: Reporter | None = None) -> Run:
    check_paths(cfg)
    rank, world, device = init_distributed()
    notes = check_flags(cfg, world)
    reporter = reporter or Reporter(enabled=rank == 0, progress=cfg.run.progress)
    for note in notes:
        reporter.info(note)
    run_dir = resolve_run_dir(cfg)
    resume_from = None
    if cfg.run.resume:
        resume_from = resume_checkpoint(run_dir, reporter)
    elif run_dir.exists() and catalog.list_steps(run_dir):
        raise StepwiseError(f"--run_name: {run_dir} already has checkpoints; pass --resume or another --run_name")
    if rank == 0:
        for leftover in clean_leftovers(run_dir):
            reporter.info(f"removed {leftover} (left by an interrupted write)")

    random.seed(cfg.optim.seed)
    torch.manual_seed(cfg.optim.seed)
    train_records, val_records = load_data(cfg, reporter)
    tokenizer, model = load_tokenizer_and_model(cfg, train_records, resume_from)
    if not (cfg.model.fsdp and world > 1):  # FSDP moves it as it shards, a layer at a time
        model.to(device)
    if cfg.model.lora_r:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total_params = sum(p.numel() for p in model.parameters())
        reporter.info(f"LoRA r={cfg.model.lora_r} alpha={cfg.model.lora_alpha} on {cfg.model.lora_target_modules}: "
                      f"{trainable:,} trainable parameters of {total_params:,} ({trainable / total_params:.2%})")

    train, train_stats = tokenize(tokenizer, train_records, cfg.data.context_length)
    val, _ = tokenize(tokenizer, val_records, cfg.data.context_length)
    if not train:
        raise StepwiseError(f"--dataset {cfg.data.dataset}: no example has an answer within --context_length")
    spe = steps_per_epoch(len(train), cfg.optim.mini_batch_size, cfg.grad_accum_steps * world)
    if spe == 0:
        raise StepwiseError(f"--total_batch_size: one step needs more examples than the {len(train)} in the data")
    total = cfg.optim.max_steps or math.ceil((cfg.optim.num_epochs or 1.0) * spe)
    lengths = [len(e["input_ids"]) for e in train]
    first_epoch = micro_batches(lengths, cfg.optim.mini_batch_size, cfg.optim.seed, 0)
    packed_to = cfg.data.context_length if cfg.data.packing else None
    reporter.info(
        f"train {len(train)} / val {len(val)} examples; {train_stats.truncated} truncated and "
        f"{train_stats.dropped} dropped at context_length {cfg.data.context_length}; "
        f"non-padding share {padding_efficiency(lengths, first_epoch, packed_to):.1%}{' packed' if packed_to else ''}")
    reporter.info(f"{cfg.grad_accum_steps} accumulation step(s) x {world} process(es); {spe} steps an epoch; "
                  f"{total} steps ({total / spe:.2f} epochs)")

    raw_model = model
    fused = fuse_layers(raw_model)
    if any(fused.values()):
        reporter.info(f"fused layers: {fused['mlp']} SwiGLU MLP(s), {fused['rmsnorm']} RMSNorm(s) keep fewer "
                      "activations for the backward")
    share_kv_heads(device)
    if cfg.data.packing:
        check_packing(raw_model, train, tokenizer.pad_token_id)
    loss_model = CausalLMLoss(raw_model)
    if cfg.model.fsdp and world > 1:  # FSDP2's hooks are on the root's own forward: it must run
        loss_model.fallback = "FSDP runs the sharded model's own forward"
    if loss_model.fallback:
        reporter.info(f"loss: the model's own forward, with full logits ({loss_model.fallback})")
    model = wrap_model(raw_model, loss_model, cfg, device, world)  # under --fsdp raw_model is sharded in place
    optimizer = make_optimizer(raw_model, cfg)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=math.ceil(total * cfg.optim.warmup_ratio), num_training_steps=total,
        min_lr_rate=cfg.optim.min_lr_ratio)

    heldout = []
    if cfg.eval.eval_prompts:
        heldout = load_prompts(cfg.eval.eval_prompts)[: cfg.eval.eval_num_prompts]
        warn_contamination(reporter, heldout, train_records, templated=cfg.data.dataset == "demo")

    stats = dict(train_examples=len(train), val_examples=len(val), truncated=train_stats.truncated,
                 dropped=train_stats.dropped, train_tokens=train_stats.tokens, supervised_tokens=train_stats.supervised,
                 steps_per_epoch=spe, total_steps=total, grad_accum_steps=cfg.grad_accum_steps, world_size=world)
    return Run(cfg, run_dir, device, rank, world, model, raw_model, tokenizer, train,
               validation_batches(val, cfg, tokenizer.pad_token_id, rank, world, lockstep=is_sharded(raw_model)),
               len(val), optimizer, scheduler, total, spe, reporter, resume_from=resume_from, heldout=heldout,
               data_stats=stats, loss_model=loss_model)


def check_packing(model: torch.nn.Module, train: list[dict], pad_id: int) -> None:
    """--packing relies on the model masking attention by position_ids (transformers' packed-sequence
    mask); a model that does not would let a row's examples see each other. Checked on two of the
    data's examples: the second's logits packed after the first must equal its logits alone."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    first, second = ({"input_ids": e["input_ids"][:8], "labels": e["input_ids"][:8]} for e in (train[0], train[-1]))
    device = next(lm.parameters()).device
    batch = collate_packed([first, second], pad_id, len(first["input_ids"]) + len(second["input_ids"]))
    was_training = lm.training
    lm.eval()
    with torch.no_grad():
        packed = lm(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                    use_cache=False).logits[0, len(first["input_ids"]):]
        alone = lm(input_ids=torch.tensor([second["input_ids"]], device=device), use_cache=False).logits[0]
    lm.train(was_training)
    if not torch.allclose(packed.float(), alone.float(), rtol=1e-4, atol=1e-4):
        raise StepwiseError(f"--packing: {type(lm).__name__} does not keep packed examples apart (its attention "
                            "ignores the position ids' sequence boundaries); train without --packing")


def warn_contamination(reporter: Reporter, heldout: list, records: list[dict], templated: bool = False) -> None:
    """Held-out prompts that also appear in the training data make their scores meaningless: say so."""
    if reporter.enabled:
        found = check_prompts_against_records([p.prompt for p in heldout], records, keys=[p.key for p in heldout])
        warn(found, reporter.console, source=f"the training data ({len(records)} records)", templated=templated)


def validation_batches(val: list[dict], cfg: Config, pad_id: int, rank: int, world: int,
                       lockstep: bool = False) -> list[dict]:
    """The validation set (or its first eval_max_batches mini batches, a fixed subset) sorted by
    length into mini batches, this process's share, collated once for every evaluation. With lockstep
    (FSDP: every forward is a collective) each rank gets as many batches, short ones topped up with a
    copy of the first whose labels are all -100 (it counts no tokens)."""
    b = cfg.optim.mini_batch_size
    order = sorted(range(len(val)), key=lambda i: len(val[i]["input_ids"]))
    batches = [order[i:i + b] for i in range(0, len(order), b)]
    if cfg.eval.eval_max_batches:
        batches = batches[: cfg.eval.eval_max_batches]
    mine = [collate([val[i] for i in batch], pad_id) for batch in batches[rank::world]]
    while lockstep and batches and len(mine) < -(-len(batches) // world):
        filler = collate([val[i] for i in batches[0]], pad_id)
        mine.append({**filler, "labels": torch.full_like(filler["labels"], -100)})
    return mine
