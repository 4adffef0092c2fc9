"""Generation: batched for scoring, streaming for the front ends (loading is trainer.inference.loading).

One code path for everyone: the trainer's held-out samples, `trainer eval`, the
web app and the REPL all format with the chat template saved beside the weights and decode with the
same rules, so an answer seen in the app is the answer that was scored.

Sampling does not use torch's global RNG: `_Sampler` draws each row from its own generator, seeded
from `settings.seed` and the row's prompt tokens, and hands `model.generate` a one-hot choice that its
greedy step then takes. So a seeded answer is the same alone or in any batch, and two front-end
threads sampling at once cannot disturb each other's draws.
"""

from __future__ import annotations

import math
import queue
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from trainer.core.errors import StepwiseError

# End-of-turn tokens of common chat templates; whichever the tokenizer knows also ends an answer.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


@dataclass
class GenerationSettings:
    max_new_tokens: int = 128
    """Most tokens to generate per answer."""
    temperature: float = 0.0
    """0 is greedy (deterministic); above 0 samples from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 keeps all)."""
    repetition_penalty: float = 1.0
    """CTRL-style penalty on tokens already in the context (1 is none)."""
    seed: int | None = 0
    """Seed of the sampling draws (None draws a fresh one each call)."""

    def __post_init__(self):
        # Written so that NaN fails every check (every comparison with NaN is false), and infinity
        # fails too: either would reach the sampler as NaN probabilities and a torch traceback.
        if not self.max_new_tokens > 0:
            raise StepwiseError(f"--max_new_tokens must be positive, got {self.max_new_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise StepwiseError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise StepwiseError(f"--top_p must be in (0, 1], got {self.top_p}")
        if not self.top_k >= 0:
            raise StepwiseError(f"--top_k must be >= 0, got {self.top_k}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise StepwiseError(f"--repetition_penalty must be a finite positive number, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Generation:
    text: str
    """The answer so far (decoded, special tokens skipped)."""
    finished: bool
    """Stopped at EOS (or the chat template's end-of-turn token) rather than at max_new_tokens."""
    new_tokens: int
    """Tokens generated, the stop token included."""
    seconds: float
    """Wall time until this answer (for a batched answer: its batch's time)."""
    done: bool = True
    """False for intermediate streaming snapshots."""

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


# --- shared pieces -------------------------------------------------------------------------------

def stop_ids(model, tokenizer) -> list[int]:
    """Token ids that end an answer: the tokenizer's EOS, the generation config's, and the chat
    template's end-of-turn token when the vocabulary has one."""
    ids = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return sorted(i for i in ids if i is not None)


def prompt_ids(tokenizer, conversation: list[dict]) -> list[int]:
    """Token ids of a conversation ending with a user turn, with the template's answer opening;
    rendered then tokenized without extra specials, exactly as trainer.training.batching does for training."""
    if not conversation or conversation[-1].get("role") != "user":
        raise StepwiseError("a conversation to answer must end with a user turn")
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _fit(ids: list[int], max_new_tokens: int, limit: int | None) -> tuple[list[int], int]:
    """Keep prompt + answer inside the model's positions. The answer length depends only on the
    settings and the model (never on the other prompts of a batch): at most half the positions when
    the model has a limit; the prompt is cut from the left so the answer opening stays at its end."""
    if not limit:
        return ids, max_new_tokens
    max_new = min(max_new_tokens, max(limit // 2, 1))
    keep = limit - max_new
    return (ids[-keep:] if len(ids) > keep else ids), max_new


def _position_limit(model) -> int | None:
    config = model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def _row_seed(seed: int, ids: list[int]) -> int:
    """A per-prompt seed: the same prompt draws the same answer alone or in any batch."""
    return zlib.crc32(torch.tensor(ids, dtype=torch.int64).numpy().tobytes(), seed & 0xFFFFFFFF)


class _Sampler:
    """The last logits processor: applies penalty, temperature, top-k and top-p, draws each row from
    its own generator, and leaves only the drawn token possible so generate's greedy step takes it."""

    def __init__(self, settings: GenerationSettings, seeds: list[int]):
        steps = []
        if settings.repetition_penalty != 1.0:
            steps.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
        if not settings.greedy:
            steps.append(TemperatureLogitsWarper(settings.temperature))
            if settings.top_k:
                steps.append(TopKLogitsWarper(settings.top_k))
            if settings.top_p < 1.0:
                steps.append(TopPLogitsWarper(settings.top_p))
        self.steps = LogitsProcessorList(steps)
        self.sample = not settings.greedy
        self.generators = []
        for seed in seeds:
            g = torch.Generator()
            g.manual_seed(seed)
            self.generators.append(g)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = self.steps(input_ids, scores)
        if not self.sample:
            return scores
        probs = torch.softmax(scores.float(), dim=-1).cpu()
        choice = torch.stack([torch.multinomial(row, 1, generator=g)[0] for row, g in zip(probs, self.generators)])
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, choice.to(scores.device).unsqueeze(1), 0.0)
        return out


def _generation_config(model, tokenizer, max_new_tokens: int):
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Every sampling field is set to its neutral value (top_k 50 is the library default, unused when
    # do_sample is off and not warned about) so a checkpoint's generation_config.json
    # (Qwen's says do_sample, temperature 0.7, ...) cannot switch on sampling behind the settings.
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, temperature=1.0, top_p=1.0,
                            top_k=50, repetition_penalty=1.0, eos_token_id=stop_ids(model, tokenizer),
                            pad_token_id=pad, use_cache=True)


def _seeds(settings: GenerationSettings, rows: list[list[int]]) -> list[int]:
    base = settings.seed if settings.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
    return [_row_seed(base, ids) for ids in rows]


def _answer(tokenizer, new_ids: list[int], stops: set[int], pad: int | None) -> tuple[str, bool, int]:
    """(text, finished, token count) of one row's generated ids: cut at the first stop token."""
    for n, tok in enumerate(new_ids):
        if tok in stops:
            return tokenizer.decode(new_ids[:n], skip_special_tokens=True), True, n + 1
    if pad is not None:  # a row that finished earlier is padded to the batch's length
        while new_ids and new_ids[-1] == pad:
            new_ids = new_ids[:-1]
    return tokenizer.decode(new_ids, skip_special_tokens=True), False, len(new_ids)


def _left_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


# --- batched -------------------------------------------------------------------------------------

@torch.inference_mode()
def generate_batch(model, tokenizer, conversations: list[list[dict]], settings: GenerationSettings,
                   batch_size: int = 16, on_batch: Callable[[int], None] | None = None) -> list[Generation]:
    """Answers to many conversations: sorted by prompt length (little padding), left-padded batches
    through model.generate with the KV cache, returned in input order. on_batch(n_done) after each batch."""
    if batch_size <= 0:
        raise StepwiseError(f"--batch_size must be positive, got {batch_size}")
    limit = _position_limit(model)
    fitted = [_fit(prompt_ids(tokenizer, c), settings.max_new_tokens, limit) for c in conversations]
    max_new = _fit([], settings.max_new_tokens, limit)[1]
    rows = [ids for ids, _ in fitted]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]), reverse=True)
    stops = set(stop_ids(model, tokenizer))
    config = _generation_config(model, tokenizer, max_new)
    device = _model_device(model)
    seeds = _seeds(settings, rows)
    out: list[Generation | None] = [None] * len(rows)
    done = 0
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask = _left_pad([rows[i] for i in chunk], config.pad_token_id, device)
        sampler = _Sampler(settings, [seeds[i] for i in chunk])
        t0 = time.perf_counter()
        result = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                logits_processor=[sampler] if sampler.steps or sampler.sample else None)
        seconds = time.perf_counter() - t0
        for row, i in enumerate(chunk):
            text, finished, n = _answer(tokenizer, result[row, ids.shape[1]:].tolist(), stops, config.pad_token_id)
            out[i] = Generation(text, finished, n, seconds)
        done += len(chunk)
        if on_batch is not None:
            on_batch(done)
    return out


# --- streaming -----------------------------------------------------------------------------------

class _TokenQueue:
    """A generate() streamer that hands each step's token to the consuming thread."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first put is the prompt
            self.prompt_seen = True
            return
        self.queue.put(int(value.reshape(-1)[0]))

    def end(self) -> None:
        pass


class _StopOnEvent:
    """A stopping criterion that ends generation when any of the events is set."""

    def __init__(self, events: list):
        self.events = events

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        stop = any(e.is_set() for e in self.events)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def _partial_text(tokenizer, ids: list[int], stops: set[int]) -> str:
    """Text of the tokens so far, holding back a trailing incomplete UTF-8 character."""
    ids = [i for i in ids if i not in stops]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return text.rstrip("\ufffd")


def stream(model, tokenizer, conversation: list[dict], settings: GenerationSettings,
           stop_event: threading.Event | None = None) -> Iterator[Generation]:
    """Snapshots of one answer as its tokens arrive (done=False), then the final one (done=True),
    whose text is exactly what generate_batch gives for the same conversation and settings.
    Setting stop_event ends generation after the current token."""
    ids, max_new = _fit(prompt_ids(tokenizer, conversation), settings.max_new_tokens, _position_limit(model))
    stops = set(stop_ids(model, tokenizer))
    config = _generation_config(model, tokenizer, max_new)
    input_ids, mask = _left_pad([ids], config.pad_token_id, _model_device(model))
    sampler = _Sampler(settings, _seeds(settings, [ids]))
    streamer = _TokenQueue()
    closing = threading.Event()  # set when the consumer leaves early, so generate stops too
    watch = [closing] + ([stop_event] if stop_event is not None else [])
    criteria = StoppingCriteriaList([_StopOnEvent(watch)])
    box: dict = {}

    def work():
        try:
            with torch.inference_mode():
                box["result"] = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config,
                                               logits_processor=[sampler] if sampler.steps or sampler.sample else None,
                                               stopping_criteria=criteria, streamer=streamer)
        except BaseException as err:  # handed to the consumer, which re-raises it in its own thread
            box["error"] = err
        finally:
            streamer.queue.put(None)

    t0 = time.perf_counter()
    thread = threading.Thread(target=work, name="stepwise-stream", daemon=True)
    thread.start()
    got: list[int] = []
    shown = None
    try:
        while True:
            tok = streamer.queue.get()
            if tok is None:
                break
            got.append(tok)
            text = _partial_text(tokenizer, got, stops)
            if text != shown:
                shown = text
                yield Generation(text, False, len(got), time.perf_counter() - t0, done=False)
    finally:
        # An abandoned stream must not leave generate running (torch aborts the process when a
        # daemon thread is still inside an op at exit).
        closing.set()
        thread.join()
    if "error" in box:
        raise box["error"]
    text, finished, n = _answer(tokenizer, box["result"][0, input_ids.shape[1]:].tolist(), stops, config.pad_token_id)
    yield Generation(text, finished, n, time.perf_counter() - t0, done=True)
