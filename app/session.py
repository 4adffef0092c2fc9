"""The comparison session both front ends share: N checkpoints side by side, one prompt, one history per side.

The web app and the REPL only render what this yields. Models come from a shared LRU cache with a
memory budget, so switching a side back to a checkpoint seen a moment ago is instant. Every side
streams in its own thread at once; a side whose model cannot load (or fails mid-answer) reports its
error and yields None while the others go on.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from trainer.core.catalog import weights_identity
from trainer.core.errors import StepwiseError, first_line
from trainer.inference.adapters import BaseModels
from trainer.inference.generate import Generation, GenerationSettings, stream
from trainer.inference.loading import LoadedModel, load_model


class ModelCache:
    """Loaded models by path, least recently used evicted first once their parameter bytes pass the
    budget (the model just asked for always stays, even alone over budget). Thread-safe: concurrent
    requests for one path load it once. A folder whose weights were rewritten (final/ gets a new best)
    is a new entry. LoRA adapter checkpoints share their base (`bases`, loaded once, counted once in
    the budget, dropped when no cached adapter uses it)."""

    def __init__(self, budget_bytes: int = 2 << 30, device: str | None = None):
        self.budget_bytes = budget_bytes
        self.device = device
        self._models: OrderedDict[tuple, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple, threading.Lock] = {}
        self.bases = BaseModels()

    @staticmethod
    def _key(path) -> tuple:
        """trainer.core.catalog.weights_identity, hashable: the weights file's path, size and mtime."""
        return tuple(sorted((k, str(v)) for k, v in weights_identity(path).items()))

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(m.nbytes for m in self._models.values()) + self.bases.nbytes

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, path) -> bool:
        return self._key(path) in self._models

    def get(self, path) -> LoadedModel:
        key = self._key(path)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # one load per path; others asking for it wait here, then hit
            with self._lock:
                if key in self._models:
                    self._models.move_to_end(key)
                    return self._models[key]
            try:
                loaded = load_model(path, self.device, bases=self.bases)
            finally:
                with self._lock:
                    self._loading.pop(key, None)
            with self._lock:
                self._models[key] = loaded
                self._evict(keep=key)
            return loaded

    def _evict(self, keep: tuple) -> None:
        def total() -> int:
            return sum(m.nbytes for m in self._models.values()) + self.bases.nbytes

        for key in list(self._models):
            if total() <= self.budget_bytes:
                break
            if key != keep:
                self._models.pop(key)
                self.bases.keep_only({m.base for m in self._models.values() if m.base})


@dataclass
class Side:
    """One column of the comparison: a checkpoint and its own conversation with it."""

    path: str | None = None
    """The checkpoint (a folder, or a hub id when the session has no root); None is an empty side."""
    history: list[dict] = field(default_factory=list)
    """Chat messages so far, user and assistant turns alternating."""
    last: Generation | None = None
    """The latest answer, with its stop reason and speed."""
    error: str | None = None
    """Why the last turn failed on this side (one line), else None."""
    label: str | None = None
    """The loaded checkpoint's label (run / step, val loss), once loaded."""


class _Either:
    """Set when either event is: the caller's stop button or the session's own shutdown."""

    def __init__(self, *events):
        self.events = [e for e in events if e is not None]

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


class CompareSession:
    """N sides, one prompt at a time asked of every side at once."""

    def __init__(self, paths=(), cache: ModelCache | None = None, settings: GenerationSettings | None = None,
                 root: str | Path | None = None):
        self.cache = cache if cache is not None else ModelCache()
        self.settings = settings if settings is not None else GenerationSettings()
        self.root = Path(root).resolve() if root is not None else None
        self.sides: list[Side] = []
        self._regenerations = 0
        for path in paths:
            self.add(path)

    # --- sides -------------------------------------------------------------------------------

    def resolve(self, path: str | None) -> str | None:
        """The path to load. Under a root, a relative path is taken from the root and the result must
        stay inside it (no `..`, no absolute path elsewhere, no symlink out)."""
        if path is None or self.root is None:
            return path
        p = Path(path)
        full = (p if p.is_absolute() else self.root / p).resolve()
        if not full.is_relative_to(self.root):
            raise StepwiseError(f"{path}: outside the checkpoint root {self.root}")
        return str(full)

    def set_side(self, i: int, path: str | None) -> None:
        """Put another checkpoint on side i; its conversation starts afresh (unless it is the same one)."""
        resolved = self.resolve(path)
        if resolved != self.sides[i].path:
            self.sides[i] = Side(path=resolved)

    def add(self, path: str | None = None) -> int:
        self.sides.append(Side(path=self.resolve(path)))
        return len(self.sides) - 1

    def drop(self, i: int) -> None:
        del self.sides[i]

    def reset(self) -> None:
        """Clear every side's conversation; the checkpoints stay."""
        self._regenerations = 0
        for side in self.sides:
            side.history, side.last, side.error = [], None, None

    # --- asking ------------------------------------------------------------------------------

    def stream_all(self, prompt: str, stop_event: threading.Event | None = None) -> Iterator[list[Generation | None]]:
        """Ask every side `prompt`; yield the current snapshot of every side (None where a side is
        empty, failed or has not started) whenever one advances. When all are done each answer joins
        its side's history (a stopped answer too, as far as it got). Closing the iterator early stops
        the threads and leaves histories as they were."""
        if not prompt.strip():
            raise StepwiseError("empty prompt")
        self._regenerations = 0
        return self._ask(prompt, stop_event, self.settings)

    def _ask(self, prompt: str, stop_event, settings: GenerationSettings) -> Iterator[list[Generation | None]]:
        active = [i for i, s in enumerate(self.sides) if s.path is not None]
        for i in active:
            side = self.sides[i]
            side.error = None
            side.history.append({"role": "user", "content": prompt})
        snapshots: list[Generation | None] = [None] * len(self.sides)
        events: queue.Queue = queue.Queue()
        shutdown = threading.Event()
        stop = _Either(stop_event, shutdown)

        def work(i: int, path: str, conversation: list[dict]):
            try:
                loaded = self.cache.get(path)
                events.put((i, "label", loaded.label))
                for gen in stream(loaded.model, loaded.tokenizer, conversation, settings, stop):
                    events.put((i, "gen", gen))
                    if shutdown.is_set():
                        break
            except Exception as err:  # reported on this side; the other sides go on
                text = first_line(err)
                events.put((i, "error", text if isinstance(err, StepwiseError) else f"{type(err).__name__}: {text}"))
            finally:
                events.put((i, "end", None))

        threads = [threading.Thread(target=work, args=(i, self.sides[i].path, list(self.sides[i].history)),
                                    name=f"stepwise-side-{i}", daemon=True) for i in active]
        for t in threads:
            t.start()
        finished = set()
        completed = False
        try:
            while len(finished) < len(active):
                i, kind, value = events.get()
                side = self.sides[i]
                if kind == "label":
                    side.label = value
                elif kind == "gen":
                    snapshots[i] = value
                    yield list(snapshots)
                elif kind == "error":
                    side.error, snapshots[i] = value, None
                    yield list(snapshots)
                else:
                    finished.add(i)
            completed = True
        finally:
            shutdown.set()
            for t in threads:  # they stop within a token once shutdown is set
                t.join()
            for i in active:
                side = self.sides[i]
                gen = snapshots[i]
                if completed and side.error is None and gen is not None and gen.done:
                    side.history.append({"role": "assistant", "content": gen.text})
                    side.last = gen
                elif side.history and side.history[-1]["role"] == "user":
                    side.history.pop()  # a failed or abandoned turn leaves no half exchange behind

    def regenerate(self, stop_event: threading.Event | None = None) -> Iterator[list[Generation | None]]:
        """Drop each side's last answer and ask its question again. With sampling and a seed, each
        regeneration draws with the next seed, so it gives a new answer that is still reproducible."""
        prompt = next((s.history[-2]["content"] for s in self.sides
                       if len(s.history) >= 2 and s.history[-1]["role"] == "assistant"), None)
        if prompt is None:
            raise StepwiseError("nothing to regenerate: ask something first")
        for side in self.sides:
            if side.history and side.history[-1]["role"] == "assistant":
                side.history.pop()
            if side.history and side.history[-1]["role"] == "user":
                side.history.pop()
        self._regenerations += 1
        settings = self.settings
        if not settings.greedy and settings.seed is not None:
            settings = dataclasses.replace(settings, seed=settings.seed + self._regenerations)
        return self._ask(prompt, stop_event, settings)
