"""Talking to the Hugging Face libraries quietly: their progress bars and logs held back, the hub's
reachability checked in seconds (instead of a minute of retries), and one lock for model loads."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from trainer.core.errors import StepwiseError

HUB_TIMEOUT_S = 2.0
# transformers resolves model classes through lazy imports that are not thread-safe: the app's
# sides load at the same time, so loads take turns (they share the disk and cores anyway).
LOAD_LOCK = threading.Lock()


@contextlib.contextmanager
def quiet_hub():
    """Hugging Face's progress bars off for the block (they would land in our log, the REPL and the
    eval display), restored after it."""
    from transformers.utils import logging

    bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            logging.enable_progress_bar()


def hub_unreachable(offline: bool | None = None) -> str | None:
    """Why the Hugging Face hub cannot be reached now (offline mode, or no answer from its host, or
    the proxy's, within HUB_TIMEOUT_S), or None when it answers. The hub client would otherwise
    retry for most of a minute and print a line per retry before failing. offline: the caller's
    library's own offline setting (default: huggingface_hub's HF_HUB_OFFLINE)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE if offline is None else offline:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_url.hostname or host, proxy_url.port or 8080
    failure: list[str] = []

    def connect():  # in a thread, because name resolution takes no timeout
        try:
            socket.create_connection((host, port), timeout=HUB_TIMEOUT_S).close()
        except OSError as err:
            failure.append(err.strerror or type(err).__name__)
        else:
            failure.append("")

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(HUB_TIMEOUT_S + 0.5)
    if not failure:
        return f"the Hugging Face hub ({host}:{port}) did not answer within {HUB_TIMEOUT_S:.0f} s"
    return f"the Hugging Face hub ({host}:{port}) cannot be reached: {failure[0]}" if failure[0] else None


def offline_error(label: str, reason: str, local: str = "a local model folder") -> StepwiseError:
    """The one line for a hub id that is not cached while the hub cannot be reached (hub_unreachable)."""
    fix = "unset HF_HUB_OFFLINE" if reason.startswith("HF_HUB_OFFLINE") else "check the network"
    return StepwiseError(f"{label}: {reason}, and it is not in the local Hugging Face cache; pass {local}, or {fix}")


def hub_access(name: str) -> str | None:
    """For a name that is no local path (a hub id): why the hub cannot be reached, if it cannot.
    Loading then looks in the local cache only, which answers at once."""
    return None if Path(name).exists() else hub_unreachable()


class _Held(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def held_logs(name: str):
    """A library's log (its root logger `name`, which holds its handlers) held back for the block:
    dropped when the block raises, since its one-line error says what was wrong (transformers'
    report of mismatched weights is a table of tens of lines, datasets logs a failed file before
    raising), and passed on as usual when it does not."""
    log = logging.getLogger(name)
    handlers, held = log.handlers[:], _Held()
    if not handlers:  # not set up by the library (yet): nothing to hold, and nothing to lose
        yield
        return
    log.handlers = [held]
    try:
        yield
    finally:
        log.handlers = handlers
    for record in held.records:  # only reached without an exception
        for handler in handlers:
            if record.levelno >= handler.level:
                handler.handle(record)
