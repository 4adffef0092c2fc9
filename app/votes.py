"""Pairwise votes between checkpoints (`<root>/votes.jsonl`), Bradley-Terry ratings from them, and
their export as a preference dataset (`python -m app.votes export`).

A vote line holds the two checkpoints (paths relative to the root), the outcome, the prompt, the two
answers, each side's conversation before its answer, the generation settings, and a UTC time: no IP
address, user name, session id or anything else about who voted. Lines written before `histories`
existed still load (as single-turn votes on `prompt`).

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
import sys
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trainer.cli.args import ArgumentParser, run_command
from trainer.core.errors import StepwiseError
from trainer.core.files import read_jsonl_lenient, write_text_atomic

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
    histories: list[list[dict]] = field(default_factory=list)
    """A's and B's conversations before their answers: lists of {role, content} ending with the user
    turn `prompt` (each column keeps its own history, so earlier answers can differ). Empty for a
    single-turn vote recorded without it, and in lines written before the field existed."""
    blind: bool = False
    """The voter did not see which checkpoints A and B were (blind mode in the app or the REPL): such
    votes are rated apart from open ones, since seeing "step 3000" biases a vote."""

    def __post_init__(self):
        if self.outcome not in OUTCOMES:
            raise StepwiseError(f"vote outcome must be one of {', '.join(OUTCOMES)}, got {self.outcome!r}")
        if not self.a or not self.b:
            raise StepwiseError("a vote needs two checkpoints")
        if self.a == self.b:
            raise StepwiseError(f"a vote needs two different checkpoints, got {self.a} twice")
        if self.histories and not (len(self.histories) == 2 and all(map(_is_conversation, self.histories))):
            raise StepwiseError("a vote's histories are two lists of {role, content} messages, A's and B's")


def _is_conversation(messages) -> bool:
    return isinstance(messages, list) and bool(messages) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages)


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
        return self.read_counted()[0]

    def read_counted(self) -> tuple[list[Vote], int]:
        """(read()'s votes, the number of non-blank lines skipped as bad)."""
        rows, bad = read_jsonl_lenient(self.path)
        votes = []
        for raw in rows:
            try:
                votes.append(Vote(**{k: raw[k] for k in raw if k in Vote.__dataclass_fields__}))
            except (ValueError, TypeError, StepwiseError):
                bad += 1
        return votes, bad


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


def ratings_tables(votes: list[Vote]) -> tuple[list[list], list[list]]:
    """ratings_table of the open votes and of the blind ones, fitted apart: a voter who saw "step 3000"
    may be biased, so the two kinds are never pooled."""
    return (ratings_table([v for v in votes if not v.blind]), ratings_table([v for v in votes if v.blind]))


# --- export as a preference dataset -------------------------------------------------------------

PREFERENCES_FILE = "preferences.jsonl"
LEFT_OUT = {"tie": ("tie", "ties"), "both_bad": ("both bad", "both bad"),
            "incomplete": ("without a shared prompt and two answers",) * 2,
            "unreadable": ("unreadable line", "unreadable lines")}
"""Why a vote line is not a preference pair -> how the export's summary names one, and several."""


@dataclass
class Preferences:
    """Decisive votes as rows of a TRL preference dataset, and what was left out."""

    rows: list[dict]
    """`prompt`, `chosen`, `rejected`, then chosen_checkpoint, rejected_checkpoint, settings, key, time."""
    conversational: bool
    """Rows hold lists of {role, content} messages rather than text."""
    left_out: dict[str, int] = field(default_factory=dict)
    """LEFT_OUT's reasons -> how many votes (or lines) each left out."""


def _conversations(vote: Vote) -> tuple[list[dict], list[dict]]:
    """The winner's and the loser's whole conversations, each ending with its answer."""
    histories = vote.histories or [[{"role": "user", "content": vote.prompt}]] * 2
    sides = [[{"role": m["role"], "content": m["content"]} for m in h] + [{"role": "assistant", "content": ans}]
             for h, ans in zip(histories, vote.answers)]
    return (sides[0], sides[1]) if vote.outcome == "a" else (sides[1], sides[0])


def preference_rows(votes: list[Vote], conversational: bool = False) -> Preferences:
    """Decisive votes (A or B better) as TRL's explicit-prompt preference format. The prompt is the
    longest common prefix of the two conversations and chosen/rejected the rest of each, as TRL's
    extract_prompt splits them: one assistant answer each when both columns saw the same earlier
    turns, or the diverging turns too when their earlier answers differed. Rows are text (TRL's
    standard form: prompt, chosen and rejected strings) when every pair is a single user turn and one
    answer and `conversational` is not asked for, else conversational (lists of {role, content}) for
    every row, since a dataset column holds one type. Ties, both-bad and votes without a prompt and two
    answers are left out and counted."""
    left_out = {reason: 0 for reason in LEFT_OUT}
    pairs = []
    for vote in votes:
        if vote.outcome in ("tie", "both_bad"):
            left_out[vote.outcome] += 1
            continue
        if len(vote.answers) != 2 or not (vote.prompt or vote.histories):
            left_out["incomplete"] += 1
            continue
        chosen, rejected = _conversations(vote)
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        while shared and chosen[shared - 1]["role"] != "user":  # the prompt ends where an answer is due
            shared -= 1
        if shared == 0:  # not even a first user turn in common: no prompt to share
            left_out["incomplete"] += 1
            continue
        pairs.append((vote, chosen[:shared], chosen[shared:], rejected[shared:]))
    single_turn = all(len(p) == 1 and len(c) == len(r) == 1 for _, p, c, r in pairs)
    as_text = single_turn and not conversational
    rows = []
    for vote, prompt, chosen, rejected in pairs:
        winner, loser = (vote.a, vote.b) if vote.outcome == "a" else (vote.b, vote.a)
        core = ({"prompt": prompt[0]["content"], "chosen": chosen[0]["content"], "rejected": rejected[0]["content"]}
                if as_text else {"prompt": prompt, "chosen": chosen, "rejected": rejected})
        rows.append({**core, "chosen_checkpoint": winner, "rejected_checkpoint": loser,
                     "settings": vote.settings, "key": vote.key, "time": vote.time})
    return Preferences(rows, conversational=not as_text, left_out=left_out)


def export_preferences(root: str | Path, out: str | Path | None = None,
                       conversational: bool = False) -> tuple[Path, Preferences]:
    """Write `<root>/votes.jsonl`'s decisive votes as a JSON Lines preference dataset at `out`
    (default `<root>/preferences.jsonl`): `datasets.load_dataset("json", data_files=out)` reads it
    and TRL's DPOTrainer trains on it. A StepwiseError (one line) for a missing root or votes file, no
    decisive vote, or an `out` that cannot be written; nothing is written then."""
    root = Path(root)
    if not root.is_dir():
        raise StepwiseError(f"--root {root}: no such folder")
    store = VoteStore(root)
    if not store.path.is_file():
        raise StepwiseError(f"{store.path}: no votes file (votes are recorded in the web app's Compare tab)")
    try:
        votes, bad = store.read_counted()
    except OSError as err:
        raise StepwiseError(f"{store.path}: cannot read ({err.strerror})") from None
    prefs = preference_rows(votes, conversational)
    prefs.left_out["unreadable"] = bad
    if not prefs.rows:
        raise StepwiseError(f"{store.path}: no decisive votes to export ({left_out_text(prefs)})")
    path = Path(out) if out is not None else root / PREFERENCES_FILE
    if path.is_dir():
        raise StepwiseError(f"--out {path}: is a directory, expected a file path")
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in prefs.rows)
    try:
        write_text_atomic(path, text)
    except OSError as err:
        raise StepwiseError(f"--out {path}: cannot write ({err.strerror or err})") from None
    return path, prefs


def left_out_text(prefs: Preferences) -> str:
    """"left out: 2 ties, 1 both bad" (reasons with a count of 0 unsaid; "none left out" if all are)."""
    parts = [f"{n} {LEFT_OUT[reason][n != 1]}" for reason, n in prefs.left_out.items() if n]
    return "left out: " + ", ".join(parts) if parts else "none left out"


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m app.votes", description="Votes between checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="export")
    export = commands.add_parser(
        "export", help="write the decisive votes as a preference dataset (TRL's prompt/chosen/rejected)",
        description="Write the decisive votes (A or B better) of <root>/votes.jsonl as a JSON Lines preference "
                    "dataset in TRL's format: prompt, chosen, rejected, plus chosen_checkpoint, rejected_checkpoint, "
                    "settings, key and time. Ties and both-bad are left out and counted.")
    export.add_argument("--root", type=Path, default=Path("checkpoints"), help="the folder holding votes.jsonl")
    export.add_argument("--out", type=Path, help=f"the dataset file (default <root>/{PREFERENCES_FILE})")
    export.add_argument("--conversational", action="store_true",
                        help="write every row as {role, content} messages, also single-turn ones (TRL applies the "
                             "model's chat template only to conversational rows)")
    args = parser.parse_args(argv)
    path, prefs = export_preferences(args.root, args.out, args.conversational)
    form = "conversational" if prefs.conversational else "standard (text)"
    n = len(prefs.rows)
    print(f"wrote {n} preference pair{'s' if n != 1 else ''}, {form}, to {path}; {left_out_text(prefs)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:]))
