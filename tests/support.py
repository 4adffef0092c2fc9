"""What the tests share besides fixtures (those are in conftest.py, built from here): the repository's
paths, running the commands as a user does, one torch thread, the tiny-model and tiny-run factory,
and the web server in a subprocess.

Every tiny checkpoint and run is written by the trainer's own writers (save_hf, save_checkpoint,
write_final, write_json_atomic), so the tests read exactly the layout a real run leaves.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

# A few seconds of real training: 3 checkpoints and final/ of the demo preset on a small dataset.
TINY_ARGS = [
    "--demo_records", "600", "--context_length", "128", "--mini_batch_size", "8",
    "--max_steps", "30", "--eval_freq", "10", "--checkpoint_freq", "10", "--log_freq", "5",
    "--learning_rate", "3e-3", "--eval_max_batches", "4", "--progress", "false",
    "--eval_prompts", "eval_prompts/demo_ifeval.jsonl", "--eval_num_prompts", "4", "--eval_max_new_tokens", "16",
]


# --- commands, as a user runs them ---------------------------------------------------------------

def python_env(**extra: str) -> dict:
    """The environment of a `python -m ...` subprocess that imports this checkout."""
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def run_trainer(args: list[str], env: dict | None = None, check: bool = True, timeout: int = 300):
    """`python -m trainer ...` in a subprocess, as a user would run it."""
    proc = subprocess.run([sys.executable, "-m", "trainer", *args], cwd=ROOT, env=python_env(**(env or {})),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@contextlib.contextmanager
def one_thread():
    """torch on one thread inside the block, the previous count restored after: the tiny models' matmuls
    on two cores shared with other work are slower on two spinning threads than on one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --- tiny models and runs --------------------------------------------------------------------------

# What the fixtures' models learn and the prompts their runs were scored on (conftest.py builds them).

PAIRS = [  # trained_checkpoint: one answer per prompt
    ("Name a fruit.", "An apple."), ("Name a colour.", "Blue."), ("Reverse: a b c", "c b a"),
    ("What is 2 plus 3?", "5"), ("Name an animal.", "A cat says meow."), ("Sort: c a b", "a b c"),
    ("Capital of France?", "Paris."), ("Say hello.", "Hello there, friend."),
]
HEADINGS = ["### Instruction:\n", "### Response:\n"]  # the demo chat template's, so they are single tokens

# answers_root: each checkpoint gives its one answer to any prompt (step 10 lowercase, step 20 capitals).
ANSWERS = {10: "alpha beta gamma delta.", 20: "THE SEA IS VERY BLUE TODAY."}
ANSWER_PROMPTS = ["hello", "write a short poem about the sea", "say something", "what is two plus two?",
                  "describe a cat", "answer in capitals", "tell me about your day"]

WEB_PROMPTS = [  # web_root: the prompts.jsonl its samples answer
    {"key": "lower", "prompt": "Write one sentence about cats, all in lowercase.",
     "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}], "reference": "cats are small cats."},
    {"key": "words", "prompt": "Name three colours in fewer than 20 words.",
     "instruction_id_list": ["length_constraints:number_words"],
     "kwargs": [{"relation": "less than", "num_words": 20}], "reference": "red green blue"},
]


@dataclass
class Tiny:
    """A demo Llama and what save_checkpoint needs besides it."""

    model: object
    tokenizer: object
    optimizer: object = None
    """The optimizer that trained it (None: untrained; write_run saves a fresh AdamW)."""
    scheduler: object = None
    """Its learning-rate schedule (None: untrained; write_run saves a constant one)."""


def tiny_tokenizer(texts: list[str], vocab_size: int):
    from trainer.training.models import build_demo_tokenizer

    return build_demo_tokenizer(texts, vocab_size=vocab_size)


def train_tiny(tokenizer, dialogues: list[list[tuple[str, str]]], steps: int, seed: int = 0,
               context_length: int = 64, lr: float = 3e-3, warmup: int = 10) -> Tiny:
    """The demo Llama (seeded) after `steps` full-batch AdamW steps on the dialogues, each a list of
    (user, assistant) turns; steps=0 is the untrained model. A few seconds on one thread.

    The learning rate warms up over `warmup` steps, then falls linearly to 0: at the full rate from
    the first step the loss spikes, and what the model has learned by the last step varies with the
    seed and the CPU's arithmetic; warmed up it converges the same way everywhere."""
    import torch

    from trainer.training.batching import collate, tokenize
    from trainer.training.models import build_demo_model

    model = build_demo_model(tokenizer, context_length, seed)
    if not steps:
        return Tiny(model.eval(), tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 1 - (s - warmup) / max(steps - warmup, 1))
    records = [{"messages": [{"role": role, "content": text} for q, a in turns
                             for role, text in (("user", q), ("assistant", a))]} for turns in dialogues]
    batch = collate(tokenize(tokenizer, records, context_length)[0], tokenizer.pad_token_id)
    with one_thread():
        torch.manual_seed(seed)
        model.train()
        for _ in range(steps):
            model(**batch).loss.backward()
            opt.step()
            scheduler.step()
            opt.zero_grad()
    return Tiny(model.eval(), tokenizer, opt, scheduler)


def save_model(tiny: Tiny, folder: Path) -> Path:
    """A Hugging Face folder outside any run (save_hf), whole or not at all."""
    from trainer.training.checkpoint import save_hf

    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf(tiny.model, tiny.tokenizer, tmp)
    tmp.rename(folder)
    return folder


@dataclass
class Step:
    """One checkpoint of a run made by write_run."""

    step: int
    tiny: Tiny
    val_loss: float | None = None
    epoch: float | None = None
    metrics: dict = field(default_factory=dict)
    """Held-out scores, as trainer_state.json's `metrics`."""
    samples: list[dict] | None = None
    """Rows of samples.jsonl (held-out answers with their scores)."""


def write_run(run_dir: Path, steps: list[Step], metrics: dict, config=None) -> Path:
    """A run folder as the trainer leaves it: config.yaml, step folders (save_checkpoint), final/ as a
    copy of metrics["best"]["checkpoint"] (write_final) and training_metrics.json (given whole)."""
    import torch

    from trainer.core.catalog import METRICS_FILE
    from trainer.core.config import Config
    from trainer.core.files import write_json_atomic, write_text_atomic
    from trainer.training.checkpoint import save_checkpoint, write_final

    run_dir.mkdir(parents=True)
    write_text_atomic(run_dir / "config.yaml", (config or Config()).to_yaml())
    for s in steps:
        opt = s.tiny.optimizer or torch.optim.AdamW(s.tiny.model.parameters())
        scheduler = s.tiny.scheduler or torch.optim.lr_scheduler.LambdaLR(opt, lambda _step: 1.0)
        state = {"step": s.step, "epoch": s.epoch, "val_loss": s.val_loss, "metrics": s.metrics}
        save_checkpoint(run_dir, s.step, s.tiny.model, s.tiny.tokenizer, opt, scheduler, state, s.samples)
    best = (metrics.get("best") or {}).get("checkpoint")
    if best:
        write_final(run_dir, run_dir / best)
    write_json_atomic(run_dir / METRICS_FILE, metrics)
    return run_dir


def copy_root(template: Path, dest: Path) -> Path:
    """A module's own copy of a session-built root, for tests that add to it."""
    shutil.copytree(template, dest)
    return dest


# --- the web app in a subprocess -------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m app.web` in a subprocess, as `make app` starts it, with root/prompts.jsonl."""

    def __init__(self, root: Path, log: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "app.web", "--root", str(root), "--port", str(self.port),
                                      "--prompts", str(root / "prompts.jsonl"), *extra],
                                     cwd=ROOT, env=python_env(GRADIO_ANALYTICS_ENABLED="False"),
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{log.read_text()}")
            try:
                urllib.request.urlopen(self.url, timeout=2).read()
                return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise AssertionError(f"server did not come up:\n{log.read_text()}")

    def alive(self) -> bool:
        return self.proc.poll() is None and urllib.request.urlopen(self.url, timeout=5).status == 200

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
