"""The training loop: setup -> fit -> finish, read top to bottom (`python -m trainer train` calls train()).

One optimizer step = `grad_accum_steps` micro-batches on each of `world_size` processes. The loss of a
step is the sum of token losses over the whole accumulated (and distributed) batch divided by its
number of supervised tokens, so accumulation and DDP give the same gradient as one large batch.
"""

from __future__ import annotations

import math
import os
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from trainer.core import catalog
from trainer.core.config import METRICS, Config
from trainer.core.errors import StepwiseError
from trainer.evals.contamination import check_prompts_against_records, warn
from trainer.evals.heldout import heldout_samples
from trainer.evals.prompts import load_prompts
from trainer.inference.generate import GenerationSettings
from trainer.training import checkpoint as ckpt
from trainer.training.batching import (
    collate,
    micro_batches,
    padding_efficiency,
    steps_per_epoch,
    tokenize,
)
from trainer.training.data import load_train_val
from trainer.training.metrics import MetricsLog, classify_trend, metrics_path, recommend
from trainer.training.models import (
    build_demo_model,
    build_demo_tokenizer,
    check_template,
    demo_texts,
    load_pretrained,
    load_pretrained_tokenizer,
)
from trainer.training.progress import Reporter


@dataclass
class Run:
    """Everything `fit` needs, built once by `setup`."""

    cfg: Config
    run_dir: Path
    device: torch.device
    rank: int
    world: int
    model: torch.nn.Module
    raw_model: torch.nn.Module
    tokenizer: object
    train: list[dict]
    val_batches: list[dict]
    """This process's share of the validation batches, collated once at setup."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total_steps: int
    steps_per_epoch: int
    log: MetricsLog
    reporter: Reporter
    start_step: int = 0
    heldout: list = field(default_factory=list)
    stop_signal: list = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def micro_per_step(self) -> int:
        return self.cfg.grad_accum_steps * self.world


def train(cfg: Config) -> int:
    """Run a resolved config to its end; the exit code (3 when a non-finite loss stopped it)."""
    run = setup(cfg)
    try:
        fit(run)
    finally:
        run.reporter.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    return 3 if run.log.stop_reason and run.log.stop_reason.startswith("non-finite") else 0


# --- setup ---------------------------------------------------------------------------------------

def init_distributed() -> tuple[int, int, torch.device]:
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
    if resume_from is not None:
        tokenizer, model = load_pretrained(str(resume_from))
    elif cfg.model.pretrained_model == "demo":
        tokenizer = build_demo_tokenizer(demo_texts(train_records))
        model = build_demo_model(tokenizer, cfg.data.context_length, cfg.optim.seed) if with_model else None
    elif with_model:
        tokenizer, model = load_pretrained(cfg.model.pretrained_model)
    else:
        tokenizer, model = load_pretrained_tokenizer(cfg.model.pretrained_model), None
    check_template(tokenizer)
    return tokenizer, model


def check_paths(cfg: Config) -> None:
    """Mistakes in paths, found before minutes of data loading rather than after."""
    out = Path(cfg.run.output_dir)
    if out.exists() and not out.is_dir():
        raise StepwiseError(f"--output_dir {out}: is a file, not a folder")
    if cfg.eval.eval_prompts and not Path(cfg.eval.eval_prompts).is_file():
        raise StepwiseError(f"--eval_prompts {cfg.eval.eval_prompts}: no such file")
    model = cfg.model.pretrained_model
    if model != "demo" and model.startswith(("/", ".", "~")) and not Path(model).expanduser().is_dir():
        raise StepwiseError(f"--pretrained_model {model}: no such folder")


def setup(cfg: Config, reporter: Reporter | None = None) -> Run:
    check_paths(cfg)
    rank, world, device = init_distributed()
    reporter = reporter or Reporter(enabled=rank == 0, progress=cfg.run.progress)
    run_dir = resolve_run_dir(cfg)
    resume_from = None
    if cfg.run.resume:
        steps = catalog.list_steps(run_dir)
        if not steps:
            raise StepwiseError(f"--resume: {run_dir} has no complete checkpoint to resume from")
        resume_from = run_dir / catalog.step_dir_name(steps[-1])
    elif run_dir.exists() and catalog.list_steps(run_dir):
        raise StepwiseError(f"--run_name: {run_dir} already has checkpoints; pass --resume or another --run_name")

    random.seed(cfg.optim.seed)
    torch.manual_seed(cfg.optim.seed)
    train_records, val_records = load_data(cfg, reporter)
    tokenizer, model = load_tokenizer_and_model(cfg, train_records, resume_from)
    model.to(device)

    train, train_stats = tokenize(tokenizer, train_records, cfg.data.context_length)
    val, _ = tokenize(tokenizer, val_records, cfg.data.context_length)
    if not train:
        raise StepwiseError(f"--dataset {cfg.data.dataset}: no example has an answer within --context_length")
    spe = steps_per_epoch(len(train), cfg.optim.mini_batch_size, cfg.grad_accum_steps * world)
    if spe == 0:
        raise StepwiseError(f"--total_batch_size: one step needs more examples than the {len(train)} in the data")
    total = cfg.optim.max_steps or math.ceil((cfg.optim.num_epochs or 1.0) * spe)
    lengths = [len(e["input_ids"]) for e in train]
    reporter.info(
        f"train {len(train)} / val {len(val)} examples; {train_stats.truncated} truncated and "
        f"{train_stats.dropped} dropped at context_length {cfg.data.context_length}; "
        f"non-padding share {padding_efficiency(lengths, micro_batches(lengths, cfg.optim.mini_batch_size, cfg.optim.seed, 0)):.1%}")
    reporter.info(f"{cfg.grad_accum_steps} accumulation step(s) x {world} process(es); {spe} steps an epoch; "
                  f"{total} steps ({total / spe:.2f} epochs)")

    raw_model = model
    if cfg.model.compile:
        model = torch.compile(model)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = make_optimizer(raw_model, cfg)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=math.ceil(total * cfg.optim.warmup_ratio), num_training_steps=total,
        min_lr_rate=cfg.optim.min_lr_ratio)

    log = MetricsLog(metrics_path(run_dir))
    log.early_stopping.metric = cfg.eval.metric_for_best_model
    log.early_stopping.patience = cfg.eval.early_stopping_patience
    log.early_stopping.threshold = cfg.eval.early_stopping_threshold
    start = 0
    if resume_from is not None:
        state = ckpt.load_training_state(resume_from, optimizer, scheduler)
        start = state["step"]
        if log.path.is_file():
            old = MetricsLog.load(log.path)  # a damaged file is a one-line error naming it
            log.history, log.data = old.history, old.data
            log.truncate(start)
        log.best = state.get("best") or {}
        log.early_stopping.__dict__.update(state.get("early_stopping") or {})
        reporter.info(f"resumed from {resume_from} at step {start}")
    log.data.update(train_examples=len(train), val_examples=len(val), truncated=train_stats.truncated,
                    dropped=train_stats.dropped, train_tokens=train_stats.tokens,
                    supervised_tokens=train_stats.supervised, steps_per_epoch=spe, total_steps=total,
                    grad_accum_steps=cfg.grad_accum_steps, world_size=world)

    heldout = []
    if cfg.eval.eval_prompts:
        heldout = load_prompts(cfg.eval.eval_prompts)[: cfg.eval.eval_num_prompts]
        warn_contamination(reporter, heldout, train_records)

    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        reporter.info(f"run folder {run_dir}")
        if cfg.run.use_tensorboard:
            reporter.open_tensorboard(run_dir / "tensorboard")
    return Run(cfg, run_dir, device, rank, world, model, raw_model, tokenizer, train,
               validation_batches(val, cfg, tokenizer.pad_token_id, rank, world), optimizer, scheduler,
               total, spe, log, reporter, start_step=start, heldout=heldout)


def warn_contamination(reporter: Reporter, heldout: list, records: list[dict]) -> None:
    """Held-out prompts that also appear in the training data make their scores meaningless: say so."""
    if reporter.enabled:
        found = check_prompts_against_records([p.prompt for p in heldout], records, keys=[p.key for p in heldout])
        warn(found, reporter.console, source=f"the training data ({len(records)} records)")


# --- fit -----------------------------------------------------------------------------------------

def autocast(run: Run):
    wanted = run.cfg.model.dtype
    if wanted == "bf16" or (wanted == "auto" and run.device.type == "cuda"):
        return torch.autocast(run.device.type, dtype=torch.bfloat16)
    return nullcontext()


def all_sum(run: Run, *values: float) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=run.device)
    if run.world > 1:
        dist.all_reduce(t)
    return t.tolist()


def accumulate(run: Run, batches: list[list[int]]) -> tuple[float, int]:
    """Forward and backward over this process's micro-batches of one step, leaving the step's
    gradient in .grad; returns (global sum of token losses, global supervised tokens)."""
    micro = [collate([run.train[i] for i in b], run.tokenizer.pad_token_id) for b in batches]
    local = sum(int((m["labels"][:, 1:] != -100).sum()) for m in micro)
    # The denominator spans every micro-batch on every process (a sync point under DDP).
    (n_tokens,) = all_sum(run, local)
    n_items = torch.tensor(n_tokens, device=run.device)
    loss_total = torch.zeros((), device=run.device)
    run.model.train()
    for i, m in enumerate(micro):
        m = {k: v.to(run.device, non_blocking=True) for k, v in m.items()}
        last = i == len(micro) - 1
        sync = nullcontext() if last or run.world == 1 else run.model.no_sync()
        with sync, autocast(run):
            # num_items_in_batch makes the model's loss a sum over tokens / n_tokens (not a per-batch mean).
            out = run.model(**m, num_items_in_batch=n_items)
            # DDP averages gradients over processes; the loss is already global, so undo the average.
            (out.loss * run.world).backward()
        loss_total += out.loss.detach().float()
    (loss_sum,) = all_sum(run, loss_total.item() * n_tokens)  # the step's one host sync for the loss
    return loss_sum, int(n_tokens)


def train_step(run: Run, batches: list[list[int]]) -> tuple[float, float, int]:
    """One optimizer step; (mean token loss, grad norm before clipping, supervised tokens)."""
    loss_sum, n_tokens = accumulate(run, batches)
    if not math.isfinite(loss_sum):
        run.optimizer.zero_grad(set_to_none=True)  # never apply a non-finite gradient
        return loss_sum / n_tokens, float("nan"), n_tokens
    clip = run.cfg.optim.max_grad_norm or float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), clip))
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss_sum / n_tokens, grad_norm, n_tokens


def validation_batches(val: list[dict], cfg: Config, pad_id: int, rank: int, world: int) -> list[dict]:
    """The validation set (or its first eval_max_batches mini batches, a fixed subset) sorted by
    length into mini batches, this process's share, collated once for every evaluation."""
    b = cfg.optim.mini_batch_size
    order = sorted(range(len(val)), key=lambda i: len(val[i]["input_ids"]))
    batches = [order[i:i + b] for i in range(0, len(order), b)]
    if cfg.eval.eval_max_batches:
        batches = batches[: cfg.eval.eval_max_batches]
    return [collate([val[i] for i in batch], pad_id) for batch in batches[rank::world]]


@torch.no_grad()
def validate(run: Run) -> float | None:
    """Token-weighted validation loss, summed across processes."""
    if not run.log.data.get("val_examples"):
        return None
    run.model.eval()
    loss_sum, count = 0.0, 0
    for batch in run.val_batches:
        m = {k: v.to(run.device) for k, v in batch.items()}
        n = int((m["labels"][:, 1:] != -100).sum())
        with autocast(run):
            out = run.raw_model(**m, num_items_in_batch=torch.tensor(n, device=run.device))
        loss_sum += out.loss.float().item() * n
        count += n
    loss_sum, count = all_sum(run, loss_sum, count)
    return loss_sum / count if count else None


def heldout_scores(run: Run) -> tuple[list[dict] | None, dict]:
    """Generate on the held-out prompts and score them (rank 0 only; the others wait at the barrier)."""
    if not run.heldout or not run.is_main:
        return None, {}
    run.raw_model.eval()
    settings = GenerationSettings(max_new_tokens=run.cfg.eval.eval_max_new_tokens)
    rows, summary = heldout_samples(run.raw_model, run.tokenizer, run.heldout, settings)
    return rows, {k: summary.get(k) for k in METRICS if k != "val_loss" and summary.get(k) is not None}


def save(run: Run, step: int, epoch: float) -> None:
    """Checkpoint (with held-out samples), update best, rotate, log. Every rank must call it."""
    samples, scores = heldout_scores(run)
    entry = run.log.entry(step)
    entry.update(scores)
    metric = run.cfg.eval.metric_for_best_model
    value = entry.get(metric)
    stop = False
    if metric != "val_loss" and value is not None:
        stop = run.log.early_stopping.update(value, step)
    if run.is_main:
        higher = METRICS[metric]
        best_value = run.log.best.get("value")
        is_best = value is not None and (best_value is None or (value > best_value if higher else value < best_value))
        if is_best:
            run.log.best = {"step": step, "epoch": round(epoch, 4), "val_loss": entry.get("val_loss"),
                            "checkpoint": catalog.step_dir_name(step), "metric": metric, "value": value}
        state = {"step": step, "epoch": epoch, "val_loss": entry.get("val_loss"), "metrics": scores,
                 "best": run.log.best, "early_stopping": asdict(run.log.early_stopping),
                 "data_position": {"epoch": step // run.steps_per_epoch, "step_in_epoch": step % run.steps_per_epoch},
                 "seed": run.cfg.optim.seed}
        path = ckpt.save_checkpoint(run.run_dir, step, run.raw_model, run.tokenizer, run.optimizer, run.scheduler,
                                    state, samples)
        removed = ckpt.rotate(run.run_dir, run.cfg.checkpoint.save_total_limit, run.log.best.get("step"))
        run.log.save()
        run.reporter.checkpoint(path, entry, removed)
        if samples is not None:
            run.reporter.samples(step, samples, scores)
    if run.world > 1:
        dist.barrier()
    if stop:
        run.stop_signal.append("early")


def evaluate_step(run: Run, step: int, epoch: float) -> bool:
    """Validation loss at an eval step; True when early stopping says stop."""
    val_loss = validate(run)
    entry = run.log.record(step, epoch=round(epoch, 4), val_loss=val_loss,
                           val_ppl=math.exp(min(val_loss, 50)) if val_loss is not None else None)
    run.log.trend = entry["trend"] = classify_trend(run.log.history)
    stop = False
    if run.cfg.eval.metric_for_best_model == "val_loss" and val_loss is not None:
        stop = run.log.early_stopping.update(val_loss, step)
    if run.is_main:
        run.log.save()
        run.reporter.evaluation(entry)
    return stop


def install_signal_handlers(run: Run) -> None:
    # Ctrl-C and SIGTERM only raise a flag: the loop finishes the step, saves and exits cleanly.
    def handler(signum, _frame):
        run.stop_signal.append(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def agreed_stop(run: Run, local: bool) -> bool:
    """All processes stop together when any of them wants to (a signal, early stopping)."""
    if run.world == 1:
        return local
    (anyone,) = all_sum(run, float(local))
    return anyone > 0


def fit(run: Run) -> None:
    cfg, log = run.cfg, run.log
    install_signal_handlers(run)
    epoch_batches: dict[int, list] = {}
    lengths = [len(e["input_ids"]) for e in run.train]
    step = run.start_step
    saved_at = evaluated_at = step if step else None
    tokens_seen = max([h.get("tokens", 0) for h in log.history], default=0)
    tokens_since, loss_since, steps_since, clock = 0, 0.0, 0, time.perf_counter()
    started = clock
    run.reporter.start(run.total_steps, step)
    while step < run.total_steps:
        epoch_index, pos = divmod(step, run.steps_per_epoch)
        if epoch_index not in epoch_batches:
            epoch_batches = {epoch_index: micro_batches(lengths, cfg.optim.mini_batch_size, cfg.optim.seed, epoch_index)}
        g, a = run.micro_per_step, cfg.grad_accum_steps
        step_batches = epoch_batches[epoch_index][pos * g:(pos + 1) * g][run.rank * a:(run.rank + 1) * a]
        loss, grad_norm, n_tokens = train_step(run, step_batches)
        step += 1
        epoch = step / run.steps_per_epoch
        if not math.isfinite(loss):
            log.stop_reason = f"non-finite loss ({loss}) at step {step}; the last good checkpoint is intact"
            run.reporter.error(log.stop_reason + "; lower --learning_rate or check the data")
            if run.is_main:
                log.save()
            return
        tokens_since += n_tokens
        tokens_seen += n_tokens
        loss_since += loss
        steps_since += 1
        run.reporter.advance(step, epoch, loss, run.scheduler.get_last_lr()[0])
        is_eval = step % cfg.eval.eval_freq == 0
        is_ckpt = step % cfg.checkpoint.checkpoint_freq == 0
        if step % cfg.run.log_freq == 0 or is_eval or is_ckpt:
            elapsed = time.perf_counter() - clock
            entry = log.record(step, epoch=round(epoch, 4), train_loss=loss_since / steps_since,
                               lr=run.scheduler.get_last_lr()[0], grad_norm=grad_norm,
                               tokens=tokens_seen,
                               tokens_per_s=tokens_since / elapsed if elapsed > 0 else None)
            log.data["tokens_per_s"] = entry.get("tokens_per_s")
            # The planner's figure: wall time per step so far, evaluations and checkpoints included.
            log.data["seconds_per_step"] = (time.perf_counter() - started) / (step - run.start_step)
            run.reporter.log(entry)
            if run.is_main:
                log.save()
            tokens_since, loss_since, steps_since, clock = 0, 0.0, 0, time.perf_counter()
        stop = False
        if is_eval:
            stop = evaluate_step(run, step, epoch)
            evaluated_at = step
        if is_ckpt:
            save(run, step, epoch)
            saved_at = step
        if agreed_stop(run, bool(run.stop_signal) or stop):
            reason = run.stop_signal[0] if run.stop_signal else "early"
            log.stop_reason = (f"early stopping at step {step}: {log.early_stopping.bad_evals} evaluations without an "
                               f"improvement > {log.early_stopping.threshold} in {log.early_stopping.metric}"
                               if reason == "early" or stop else f"interrupted ({reason}) at step {step}")
            break
    else:
        log.stop_reason = f"finished: reached {run.total_steps} steps"
    finish(run, step, saved_at, evaluated_at, interrupted=bool(run.stop_signal) and run.stop_signal[0] != "early")


def finish(run: Run, step: int, saved_at: int | None, evaluated_at: int | None, interrupted: bool = False) -> None:
    """Evaluate and checkpoint the last step if needed, write final/ (the best), recommend.

    An interrupted run is checkpointed without an extra evaluation, so resuming it replays exactly
    what an uninterrupted run would have done."""
    epoch = step / run.steps_per_epoch
    if step and evaluated_at != step and not interrupted:
        evaluate_step(run, step, epoch)
    if step and saved_at != step:
        save(run, step, epoch)
    log = run.log
    log.recommendation = recommend(log.trend or "improving", epoch, log.best)
    if run.is_main:
        if run.cfg.checkpoint.load_best_model_at_end and log.best.get("checkpoint"):
            ckpt.write_final(run.run_dir, run.run_dir / log.best["checkpoint"])
        log.save()
        run.reporter.finish(log, run.run_dir)
    if run.world > 1:
        # Tear the process group down together: a rank that leaves while another still writes
        # final/ can abort in gloo's shutdown ("terminate called without an active exception").
        dist.barrier()

