"""The training loop: setup -> fit -> finish, read top to bottom (`python -m trainer train` calls train()).

One optimizer step = `grad_accum_steps` micro-batches on each of `world_size` processes. The loss of a
step is the sum of token losses over the whole accumulated (and distributed) batch divided by its
number of supervised tokens, so accumulation and DDP or FSDP give the same gradient as one large batch.

A step whose loss or gradient norm is not finite is never applied: its gradient is dropped (the step
still counts, so the data order and the schedule stay those of an uninterrupted run), and after
--max_bad_steps such steps in a row the run stops with exit code 3. No checkpoint is written with
non-finite weights and no NaN is ever chosen as best.
"""

from __future__ import annotations

import math
import signal
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from trainer.core import catalog
from trainer.core.config import METRICS, Config
from trainer.core.errors import StepwiseError, first_line
from trainer.core.files import write_text_atomic
from trainer.evals.heldout import heldout_samples
from trainer.inference.generate import GenerationSettings
from trainer.training import checkpoint as ckpt
from trainer.training import distributed
from trainer.training.batching import collate, collate_packed, micro_batches
from trainer.training.metrics import (
    MetricsLog,
    classify_trend,
    improves,
    metrics_path,
    recommend,
)
from trainer.training.setup import Run, setup

NON_FINITE = "non-finite"


@dataclass
class Window:
    """Sums since the last train-loss log entry. Saved with every checkpoint, so a run resumed from
    any step logs exactly the windows an uninterrupted run logs."""

    loss_sum: float = 0.0
    steps: int = 0
    tokens: int = 0
    """Supervised tokens (the answers' labels) since the last log entry."""
    tokens_seen: int = 0
    nonpad_tokens: int = 0
    """Non-padding tokens (the attention mask's sum, prompts included) since the last log entry."""
    nonpad_seen: int = 0


@dataclass
class State:
    """What changes while the run trains."""

    log: MetricsLog
    step: int = 0
    window: Window = field(default_factory=Window)
    saved_at: int | None = None
    evaluated_at: int | None = None
    bad_steps: int = 0
    """Non-finite steps in a row (skipped)."""
    stop_signal: list = field(default_factory=list)


def train(cfg: Config) -> int:
    """Run a resolved config to its end; the exit code (3 when non-finite steps stopped it)."""
    run = setup(cfg)
    try:
        state = begin(run)
        fit(run, state)
    except OSError as err:  # a write the OS refused (disk full, read-only): one line naming the file
        raise StepwiseError(f"{err.filename or run.run_dir}: could not write ({err.strerror or first_line(err)}); "
                            "the checkpoints already written are intact: fix it and --resume") from None
    finally:
        run.reporter.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    return 3 if (state.log.stop_reason or "").startswith(NON_FINITE) else 0


def begin(run: Run) -> State:
    """The run's state at its first step: fresh, or restored from the checkpoint being resumed; the
    run folder, config.yaml and TensorBoard opened (rank 0)."""
    cfg = run.cfg
    log = MetricsLog(metrics_path(run.run_dir))
    log.early_stopping.metric = cfg.eval.metric_for_best_model
    log.early_stopping.patience = cfg.eval.early_stopping_patience
    log.early_stopping.threshold = cfg.eval.early_stopping_threshold
    state = State(log)
    if run.resume_from is not None:
        saved = ckpt.load_training_state(run.resume_from, run.optimizer, run.scheduler,
                                         distributed.optimizer_loader(run.raw_model, run.optimizer, run.rank))
        changed = apply_optimizer_settings(run)
        state.step = state.saved_at = state.evaluated_at = saved["step"]
        state.window = Window(**saved.get("log_window", {}))
        if log.path.is_file():
            old = MetricsLog.load(log.path)  # a damaged file is a one-line error naming it
            log.history, log.data = old.history, old.data
            log.truncate(state.step)
        if not saved.get("log_window"):  # a checkpoint from before windows were saved
            state.window.tokens_seen = max([h.get("tokens", 0) for h in log.history], default=0)
        log.best = saved.get("best") or {}
        log.early_stopping.__dict__.update(saved.get("early_stopping") or {})
        if changed:
            log.data.setdefault("resumes", []).append({"step": state.step, "changed": changed})
            run.reporter.info("changed on resume: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
        run.reporter.info(f"resumed from {run.resume_from} at step {state.step}")
    log.data.update(run.data_stats)
    if run.is_main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run.run_dir / "config.yaml", cfg.to_yaml())
        run.reporter.info(f"run folder {run.run_dir}")
        if cfg.run.use_tensorboard:
            run.reporter.open_tensorboard(run.run_dir / "tensorboard")
    return state


def apply_optimizer_settings(run: Run) -> dict:
    """Put the config's learning rate and weight decay into the restored optimizer and schedule
    (a checkpoint's state would otherwise silently keep the old ones); {name: (old, new)} changed."""
    o = run.cfg.optim
    changed = {}
    old_lr = run.scheduler.base_lrs[0]
    if old_lr != o.learning_rate:
        changed["learning_rate"] = (old_lr, o.learning_rate)
        run.scheduler.base_lrs = [o.learning_rate] * len(run.optimizer.param_groups)
        for group, factor in zip(run.optimizer.param_groups, run.scheduler.lr_lambdas):
            group["initial_lr"] = o.learning_rate
            group["lr"] = o.learning_rate * factor(run.scheduler.last_epoch)
        run.scheduler._last_lr = [g["lr"] for g in run.optimizer.param_groups]
    decay = run.optimizer.param_groups[0]
    if decay["weight_decay"] != o.weight_decay:
        changed["weight_decay"] = (decay["weight_decay"], o.weight_decay)
        decay["weight_decay"] = o.weight_decay
    return changed


# --- one step ------------------------------------------------------------------------------------

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
    pad, packing = run.tokenizer.pad_token_id, run.cfg.data.packing
    micro = [collate_packed([run.train[i] for i in b], pad, run.cfg.data.context_length) if packing
             else collate([run.train[i] for i in b], pad) for b in batches]
    local = sum(int((m["labels"][:, 1:] != -100).sum()) for m in micro)
    # The denominator spans every micro-batch on every process (a sync point under DDP).
    (n_tokens,) = all_sum(run, local)
    n_items = torch.tensor(n_tokens, device=run.device)
    loss_total = torch.zeros((), device=run.device)
    run.model.train()
    # FSDP2's sync switch is on the sharded model itself; DDP's no_sync on its wrapper.
    sync_target = run.raw_model if distributed.is_sharded(run.raw_model) else run.model
    for i, m in enumerate(micro):
        m = {k: v.to(run.device, non_blocking=True) for k, v in m.items()}
        last = i == len(micro) - 1
        # DDP and FSDP average gradients over processes; the loss is already global: undo the average.
        with distributed.grad_sync(sync_target, sync=last), autocast(run):
            # num_items_in_batch makes the loss a sum over tokens / n_tokens (not a per-batch mean).
            loss = run.model(**m, num_items_in_batch=n_items)
            (loss * run.world).backward()
        loss_total += loss.detach().float()
    (loss_sum,) = all_sum(run, loss_total.item() * n_tokens)  # the step's one host sync for the loss
    return loss_sum, int(n_tokens)


def train_step(run: Run, batches: list[list[int]]) -> tuple[float, float, int]:
    """One optimizer step; (mean token loss, grad norm before clipping, supervised tokens). A
    non-finite loss or gradient norm drops the gradient instead of applying it (the same on every
    process: both are global)."""
    loss_sum, n_tokens = accumulate(run, batches)
    grad_norm = float("nan")
    if math.isfinite(loss_sum):
        clip = run.cfg.optim.max_grad_norm or float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), clip))
    if math.isfinite(loss_sum) and math.isfinite(grad_norm):
        run.optimizer.step()
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()" when step 1 is skipped
        warnings.simplefilter("ignore", UserWarning)
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss_sum / n_tokens, grad_norm, n_tokens


# --- evaluations and checkpoints -----------------------------------------------------------------

@torch.no_grad()
def validate(run: Run) -> float | None:
    """Token-weighted validation loss, summed across processes."""
    if not run.val_examples:
        return None
    run.model.eval()
    loss_sum, count = 0.0, 0
    for batch in run.val_batches:
        m = {k: v.to(run.device) for k, v in batch.items()}
        n = int((m["labels"][:, 1:] != -100).sum())
        with autocast(run):
            loss = run.loss_model(**m, num_items_in_batch=torch.tensor(n, device=run.device))
        if n:  # an FSDP filler batch (no labels) only keeps the ranks in step
            loss_sum += loss.float().item() * n
            count += n
    loss_sum, count = all_sum(run, loss_sum, count)
    return loss_sum / count if count else None


def evaluate_step(run: Run, state: State, epoch: float) -> bool:
    """Validation loss at an eval step; True when early stopping says stop."""
    val_loss = validate(run)
    ok = val_loss is not None and math.isfinite(val_loss)
    entry = state.log.record(state.step, epoch=round(epoch, 4), val_loss=val_loss,
                             val_ppl=math.exp(min(val_loss, 50)) if ok else None)
    state.log.trend = entry["trend"] = classify_trend(state.log.history)
    state.evaluated_at = state.step
    stop = False
    if run.cfg.eval.metric_for_best_model == "val_loss" and val_loss is not None:
        stop = state.log.early_stopping.update(val_loss, state.step)
    if run.is_main:
        state.log.save()
        run.reporter.evaluation(entry)
    return stop


def heldout_scores(run: Run, model: torch.nn.Module) -> tuple[list[dict] | None, dict]:
    """Generate on the held-out prompts and score them (rank 0 only; the others wait at the barrier)."""
    if not run.heldout or not run.is_main:
        return None, {}
    model.eval()
    settings = GenerationSettings(max_new_tokens=run.cfg.eval.eval_max_new_tokens)
    rows, summary = heldout_samples(model, run.tokenizer, run.heldout, settings)
    return rows, {k: summary.get(k) for k in METRICS if k != "val_loss" and summary.get(k) is not None}


def checkpoint(run: Run, state: State, epoch: float, interrupted: bool = False) -> bool:
    """At a checkpoint step: held-out scores, best model and early stopping, then save(). Every rank
    calls it; True when early stopping on a held-out metric says stop."""
    step, log = state.step, state.log
    # Under FSDP every rank gathers and rank 0 generates with, and saves, the full copy it received.
    model, optimizer = distributed.gathered(run.raw_model, run.optimizer, run.rank)
    samples, scores = heldout_scores(run, model)
    # A checkpoint taken only because the run was interrupted adds no history entry: the resumed
    # run's history then equals an uninterrupted one.
    entry = log.entry(step) if not interrupted or (log.history and log.history[-1]["step"] == step) else {}
    entry.update(scores)
    metric = run.cfg.eval.metric_for_best_model
    value = entry.get(metric)
    stop = False
    if metric != "val_loss" and value is not None:
        stop = log.early_stopping.update(value, step)
    if not ckpt.model_finite(run.raw_model):  # every rank: they hold the same weights and must agree
        raise StepwiseError(f"step {step}: the weights are not finite; no checkpoint written, the last "
                            f"one ({catalog.step_dir_name(state.saved_at or 0)}) is intact")
    if run.is_main:
        if improves(metric, value, log.best.get("value")):
            log.best = {"step": step, "epoch": round(epoch, 4), "val_loss": entry.get("val_loss"),
                        "checkpoint": catalog.step_dir_name(step), "metric": metric, "value": value}
        save(run, state, epoch, entry, scores, samples, model, optimizer)
    if run.world > 1:
        dist.barrier()
    state.saved_at = step
    return stop


def save(run: Run, state: State, epoch: float, entry: dict, scores: dict, samples: list[dict] | None,
         model: torch.nn.Module, optimizer) -> None:
    """Write the checkpoint of `model` and `optimizer` (an optimizer or its gathered state dict; never
    non-finite weights), rotate, and write the metrics."""
    step, log = state.step, state.log
    trainer_state = {"step": step, "epoch": epoch, "val_loss": entry.get("val_loss"), "metrics": scores,
                     "best": log.best, "early_stopping": asdict(log.early_stopping), "log_window": asdict(state.window),
                     "data_position": {"epoch": step // run.steps_per_epoch, "step_in_epoch": step % run.steps_per_epoch},
                     "seed": run.cfg.optim.seed}
    path = ckpt.save_checkpoint(run.run_dir, step, model, run.tokenizer, optimizer, run.scheduler,
                                trainer_state, samples)
    removed = ckpt.rotate(run.run_dir, run.cfg.checkpoint.save_total_limit, log.best.get("step"))
    log.save()
    run.reporter.checkpoint(path, scores, removed)
    if samples is not None:
        run.reporter.samples(step, samples, scores)


# --- the loop ------------------------------------------------------------------------------------

def install_signal_handlers(state: State) -> None:
    # Ctrl-C and SIGTERM only raise a flag: the loop finishes the step, saves and exits cleanly.
    def handler(signum, _frame):
        state.stop_signal.append(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def agreed_stop(run: Run, local: bool) -> bool:
    """All processes stop together when any of them wants to (a signal, early stopping)."""
    if run.world == 1:
        return local
    (anyone,) = all_sum(run, float(local))
    return anyone > 0


def step_batches(run: Run, step: int, cache: dict) -> list[list[int]]:
    """This process's micro-batches of the step after `step` (the epoch's batches cached in `cache`)."""
    epoch_index, pos = divmod(step, run.steps_per_epoch)
    if epoch_index not in cache:
        lengths = [len(e["input_ids"]) for e in run.train]
        cache.clear()
        cache[epoch_index] = micro_batches(lengths, run.cfg.optim.mini_batch_size, run.cfg.optim.seed, epoch_index)
    g, a = run.micro_per_step, run.cfg.grad_accum_steps
    return cache[epoch_index][pos * g:(pos + 1) * g][run.rank * a:(run.rank + 1) * a]


def step_nonpad_tokens(run: Run, step: int, cache: dict) -> int:
    """Non-padding tokens of the step after `step` on all processes together: every process knows the
    whole step's micro-batches (step_batches slices them), so this needs no sync."""
    epoch_index, pos = divmod(step, run.steps_per_epoch)
    g = run.micro_per_step
    return sum(len(run.train[i]["input_ids"]) for b in cache[epoch_index][pos * g:(pos + 1) * g] for i in b)


def log_step(run: Run, state: State, epoch: float, grad_norm: float, elapsed: float, started: float,
             first_step: int) -> None:
    w = state.window
    entry = state.log.record(state.step, epoch=round(epoch, 4),
                             train_loss=w.loss_sum / w.steps if w.steps else None,
                             lr=run.scheduler.get_last_lr()[0], grad_norm=grad_norm if math.isfinite(grad_norm) else None,
                             tokens=w.tokens_seen, nonpad_tokens=w.nonpad_seen,
                             tokens_per_s=w.tokens / elapsed if elapsed > 0 else None)
    state.log.data["tokens_per_s"] = entry.get("tokens_per_s")
    # Time-dependent, so kept out of the history (a resumed run's history equals an uninterrupted one's).
    state.log.data["nonpad_tokens_per_s"] = nonpad_rate = w.nonpad_tokens / elapsed if elapsed > 0 else None
    # The planner's figure: wall time per step so far, evaluations and checkpoints included.
    state.log.data["seconds_per_step"] = (time.perf_counter() - started) / (state.step - first_step)
    if entry.get("train_loss") is not None:
        run.reporter.log({**entry, "nonpad_tokens_per_s": nonpad_rate})
    if run.is_main:
        state.log.save()
    state.window = Window(tokens_seen=w.tokens_seen, nonpad_seen=w.nonpad_seen)


def fit(run: Run, state: State) -> None:
    cfg, log = run.cfg, state.log
    install_signal_handlers(state)
    cache: dict = {}
    first_step = state.step
    started = clock = time.perf_counter()
    run.reporter.start(run.total_steps, state.step)
    while state.step < run.total_steps:
        loss, grad_norm, n_tokens = train_step(run, step_batches(run, state.step, cache))
        nonpad = step_nonpad_tokens(run, state.step, cache)
        state.step += 1
        step, epoch = state.step, state.step / run.steps_per_epoch
        if math.isfinite(loss) and math.isfinite(grad_norm):
            state.bad_steps = 0
            state.window.loss_sum += loss
            state.window.steps += 1
        else:
            state.bad_steps += 1
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            run.reporter.error(f"step {step}: {what} is {loss if what == 'loss' else grad_norm}; update skipped "
                               f"({state.bad_steps} in a row, the run stops at --max_bad_steps {cfg.optim.max_bad_steps})")
            if state.bad_steps >= cfg.optim.max_bad_steps:
                last = catalog.list_steps(run.run_dir)
                log.stop_reason = (f"{NON_FINITE} loss or gradient in {state.bad_steps} steps in a row (to step {step}); "
                                   "none was applied, and "
                                   + (f"the last checkpoint ({catalog.step_dir_name(last[-1])}) is intact and finite"
                                      if last else "no checkpoint was written"))
                run.reporter.error(log.stop_reason + "; lower --learning_rate (it applies on --resume) or check the data")
                if run.is_main:
                    log.save()
                return
        state.window.tokens += n_tokens
        state.window.tokens_seen += n_tokens
        state.window.nonpad_tokens += nonpad
        state.window.nonpad_seen += nonpad
        run.reporter.advance(step, epoch, loss, run.scheduler.get_last_lr()[0])
        is_eval = step % cfg.eval.eval_freq == 0
        is_ckpt = step % cfg.checkpoint.checkpoint_freq == 0
        if step % cfg.run.log_freq == 0 or is_eval or is_ckpt:
            log_step(run, state, epoch, grad_norm, time.perf_counter() - clock, started, first_step)
            clock = time.perf_counter()
        stop = evaluate_step(run, state, epoch) if is_eval else False
        if is_ckpt:
            stop = checkpoint(run, state, epoch) or stop
        if agreed_stop(run, bool(state.stop_signal) or stop):
            reason = state.stop_signal[0] if state.stop_signal else "early"
            es = log.early_stopping
            log.stop_reason = (f"early stopping at step {step}: {es.bad_evals} evaluations without an "
                               f"improvement > {es.threshold} in {es.metric}"
                               if reason == "early" or stop else f"interrupted ({reason}) at step {step}")
            break
    else:
        log.stop_reason = f"finished: reached {run.total_steps} steps"
    finish(run, state, interrupted=bool(state.stop_signal) and state.stop_signal[0] != "early")


def finish(run: Run, state: State, interrupted: bool = False) -> None:
    """Evaluate and checkpoint the last step if needed, write final/ (the best), recommend.

    An interrupted run is checkpointed without an extra evaluation (and without a history entry),
    so resuming it replays exactly what an uninterrupted run would have done."""
    step, log = state.step, state.log
    epoch = step / run.steps_per_epoch
    if step and state.evaluated_at != step and not interrupted:
        evaluate_step(run, state, epoch)
    if step and state.saved_at != step:
        checkpoint(run, state, epoch, interrupted=interrupted)
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
