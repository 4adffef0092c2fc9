"""Pairwise votes between checkpoints (`<root>/votes.jsonl`) and Bradley-Terry ratings from them.

A vote line holds the two checkpoints (paths relative to the root), the outcome, the prompt, the two
answers and the generation settings, and a UTC time: no IP address, user name, session id or
anything else about who voted.

Ratings are Bradley-Terry strengths fitted by Hunter's MM algorithm (2004) and shown on the Elo
scale (1000 + 400 log10 strength), as Chatbot Arena reports them. Unlike online Elo they do not
depend on the order the votes came in. A tie and "both bad" each count as half a win for each side;
every checkpoint also plays one virtual tied game against a fixed 1000-rated anchor, which keeps
a checkpoint that never lost (or never won) finite and pulls ratings with few votes towards 1000.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trainer.core.errors import StepwiseError

VOTES_FILE = "votes.jsonl"
OUTCOMES = ("a", "b", "tie", "both_bad")
"""`a` better, `b` better, a tie, both bad."""
OUTCOME_LABELS = {"a": "A better", "b": "B better", "tie": "Tie", "both_bad": "Both bad"}
BASE_RATING = 1000.0
SCALE = 400.0
PRIOR_GAMES = 1.0


@dataclass
class Vote:
    """One judgement between two checkpoints on one prompt."""

    a: str
    """Checkpoint A, relative to the root (`run/step-000500`)."""
    b: str
    """Checkpoint B, relative to the root."""
    outcome: str
    """One of OUTCOMES."""
    prompt: str = ""
    """The last prompt both answered."""
    answers: list[str] = field(default_factory=list)
    """A's and B's answers to it."""
    key: str | None = None
    """The held-out prompt's key when the prompt came from a held-out file."""
    settings: dict = field(default_factory=dict)
    """Generation settings both answers were made with."""
    time: str = ""
    """UTC, to the second."""

    def __post_init__(self):
        if self.outcome not in OUTCOMES:
            raise StepwiseError(f"vote outcome must be one of {', '.join(OUTCOMES)}, got {self.outcome!r}")
        if not self.a or not self.b:
            raise StepwiseError("a vote needs two checkpoints")
        if self.a == self.b:
            raise StepwiseError(f"a vote needs two different checkpoints, got {self.a} twice")


class VoteStore:
    """Appends votes to `<root>/votes.jsonl` (one JSON a line) and reads them back."""

    def __init__(self, root: str | Path):
        self.path = Path(root) / VOTES_FILE
        self._lock = threading.Lock()

    def append(self, vote: Vote) -> Vote:
        if not vote.time:
            vote.time = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        line = (json.dumps(asdict(vote), ensure_ascii=False) + "\n").encode()
        # One write on an O_APPEND descriptor: lines from several server processes do not interleave.
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        return vote

    def read(self) -> list[Vote]:
        """Every well-formed vote; a torn or hand-edited bad line is skipped, not fatal."""
        if not self.path.is_file():
            return []
        votes = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                raw = json.loads(line)
                votes.append(Vote(**{k: raw[k] for k in raw if k in Vote.__dataclass_fields__}))
            except (ValueError, TypeError, StepwiseError):
                continue
        return votes


@dataclass
class Rating:
    """A checkpoint's Bradley-Terry rating and its vote counts."""

    checkpoint: str
    rating: float
    votes: int = 0
    wins: int = 0
    losses: int = 0
    ties: int = 0
    both_bad: int = 0


def _scores(vote: Vote) -> tuple[float, float]:
    """(A's share of the win, B's share)."""
    return {"a": (1.0, 0.0), "b": (0.0, 1.0)}.get(vote.outcome, (0.5, 0.5))


def bradley_terry(votes: list[Vote], iters: int = 2000, tol: float = 1e-10) -> dict[str, float]:
    """Checkpoint -> strength, fitted by MM with one virtual tied game against an anchor of strength 1."""
    names = sorted({v.a for v in votes} | {v.b for v in votes})
    wins: dict[str, float] = defaultdict(float)
    games: dict[tuple[str, str], float] = defaultdict(float)
    for v in votes:
        sa, sb = _scores(v)
        wins[v.a] += sa
        wins[v.b] += sb
        games[(v.a, v.b)] += 1.0
        games[(v.b, v.a)] += 1.0
    opponents: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for (i, j), n in games.items():
        opponents[i].append((j, n))
    strength = {n: 1.0 for n in names}
    for _ in range(iters):
        new = {}
        for i in names:
            denom = PRIOR_GAMES / (strength[i] + 1.0)
            denom += sum(n / (strength[i] + strength[j]) for j, n in opponents[i])
            new[i] = (wins[i] + 0.5 * PRIOR_GAMES) / denom
        delta = max((abs(math.log(new[n] / strength[n])) for n in names), default=0.0)
        strength = new
        if delta < tol:
            break
    return strength


def ratings(votes: list[Vote]) -> list[Rating]:
    """One row per checkpoint that has votes, best first."""
    strength = bradley_terry(votes)
    rows = {name: Rating(name, BASE_RATING + SCALE * math.log10(s)) for name, s in strength.items()}
    for v in votes:
        a, b = rows[v.a], rows[v.b]
        a.votes += 1
        b.votes += 1
        if v.outcome == "a":
            a.wins += 1
            b.losses += 1
        elif v.outcome == "b":
            b.wins += 1
            a.losses += 1
        elif v.outcome == "tie":
            a.ties += 1
            b.ties += 1
        else:
            a.both_bad += 1
            b.both_bad += 1
    return sorted(rows.values(), key=lambda r: (-r.rating, r.checkpoint))


RATING_HEADERS = ["checkpoint", "rating", "votes", "wins", "losses", "ties", "both bad"]


def ratings_table(votes: list[Vote]) -> list[list]:
    """Rows for a table with RATING_HEADERS."""
    return [[r.checkpoint, round(r.rating, 1), r.votes, r.wins, r.losses, r.ties, r.both_bad] for r in ratings(votes)]
