"""The REPL's chat loop: panels over a comparison session and the commands about checkpoints, settings,
conversations and votes.

`python -m app.repl` (app/repl.py, which adds the commands that score answers or save them, and Tab
completion) starts it; what a person sees goes through a ChatIO (app/chatio.py). Checkpoints are named by
trainer.core.catalog's label. Votes go to `<root>/votes.jsonl` through app.votes, the web app's file.

Blind mode (`/blind`) titles the panels A, B, C, D only, in an order shuffled by the session's own
random generator, until a vote reveals them; its votes are marked `blind`. Ctrl-C follows
app.chatio.CtrlC: it stops an answer, ends a command that is working, and is ignored anywhere else,
so only /quit or Ctrl-D end the session.
"""

from __future__ import annotations

import dataclasses
import random
import shlex
import string
from pathlib import Path

from app.catalog import checkpoint_id, fmt, spread
from app.chatio import ChatIO, CtrlC, PanelView, StopFlag
from app.votes import Vote, VoteStore
from trainer.core.catalog import checkpoint_label, is_checkpoint, list_runs, read_run
from trainer.core.errors import StepwiseError, first_line
from trainer.evals.prompts import HeldoutPrompt, load_prompts
from trainer.inference.generate import GenerationSettings

MAX_PANELS = 4
PROMPT = "you> "
MAX_NEW_TOKENS = 512
"""The cap on max_new_tokens without --max_new_tokens: the web app's (`python -m app.web`) default."""
LETTERS = string.ascii_uppercase


# --- which checkpoints ---------------------------------------------------------------------------

def run_selection(run, limit: int = MAX_PANELS) -> list[Path]:
    final = [c for c in run.checkpoints if c.is_final]
    final_step = final[0].step if final else None
    steps = [c for c in run.checkpoints if not c.is_final and c.step != final_step]
    return [c.path for c in spread(steps, limit - len(final)) + final]


def resolve(arg: str, root: Path) -> list[Path]:
    """A checkpoint or a run folder, as given or under root."""
    for cand in (Path(arg), root / arg):
        if is_checkpoint(cand):
            return [cand]
        if cand.is_dir() and (run := read_run(cand)).checkpoints:
            return run_selection(run)
    raise StepwiseError(f"{arg}: not a checkpoint or run folder (nor under {root})")


# --- panels and votes ----------------------------------------------------------------------------

def letter(i: int) -> str:
    return LETTERS[i] if i < len(LETTERS) else str(i + 1)


def panel_index(word: str, n: int, what: str) -> int:
    """A panel named by its letter (A, b) or its number (1-based) -> its index."""
    if not n:
        raise StepwiseError(f"{what}: there are no panels (/load one)")
    k = int(word) - 1 if word.isdigit() else LETTERS.find(word.upper()) if len(word) == 1 else -1
    if not 0 <= k < n:
        raise StepwiseError(f"{what}: {word!r} is not a panel (A to {letter(n - 1)}, or 1 to {n})")
    return k


VOTE_USAGE = "usage: /vote A|B|tie|bad with two panels; with more, /vote A C (A better than C) or /vote tie|bad A C"


def parse_vote(arg: str, n: int) -> tuple[int, int, str]:
    """/vote's words -> (panel i, panel j, app.votes outcome of i against j), i < j."""
    words = arg.split()
    kind = words[0].lower() if words and words[0].lower() in ("tie", "bad") else None
    panels = [panel_index(w, n, "/vote") for w in (words[1:] if kind else words)]
    if len(panels) == 2 and panels[0] != panels[1]:
        first, other = panels
    elif len(panels) == (0 if kind else 1) and n == 2:
        first = panels[0] if panels else 0
        other = 1 - first
    else:
        raise StepwiseError(VOTE_USAGE)
    i, j = sorted((first, other))
    outcome = {"tie": "tie", "bad": "both_bad"}.get(kind) or ("a" if first == i else "b")
    return i, j, outcome


def on_off(arg: str, current: bool, command: str) -> bool:
    """`on`, `off`, or nothing to toggle."""
    word = arg.lower()
    if word not in ("", "on", "off"):
        raise StepwiseError(f"usage: {command} [on|off], got {arg!r}")
    return (not current) if not word else word == "on"


# --- the loop ------------------------------------------------------------------------------------

class ChatLoop:
    """The chat loop: owns the session (histories) and the commands; shows everything through a ChatIO."""

    def __init__(self, session, io: ChatIO, root: Path, prompts_path: str, seed: int | None = None,
                 max_new_tokens: int = MAX_NEW_TOKENS):
        self.session, self.io, self.root, self.prompts_path = session, io, Path(root), prompts_path
        self.max_new_tokens = max_new_tokens
        """The cap /params may not go above (--max_new_tokens)."""
        self._prompts: list[HeldoutPrompt] | None = None
        self._titles: dict[str, str] = {}
        self._sizes: dict[str, int] = {}  # parameter bytes of each model loaded, by path
        self._stop = StopFlag()  # the current answer's; set by Ctrl-C
        self.ctrl_c = CtrlC()
        self.rng = random.Random(seed)
        self.shuffler = random.Random(seed)  # blind order; apart from rng so /heldout draws stay the same
        self.last_prompt: str | None = None
        self.turn = 0  # chat prompts asked; a vote is taken once per pair of panels per turn
        self.turn_settings: GenerationSettings | None = None  # what the last turn's answers were made with
        self.voted: set[tuple[int, int, int]] = set()
        self.show_history = False  # /history on: panels show the whole conversation
        self.blind = False  # /blind on: panels titled by letter and shuffled at each round
        self.hidden = False  # blind, and no vote has revealed this round's titles yet
        self.votes = VoteStore(self.root)
        self.commands = self.command_table()

    def command_table(self) -> dict:
        """Name -> (method, usage, help), in /help's order."""
        return {
            "/models": (self.cmd_models, "", "checkpoints under the root (their numbers work with /load)"),
            "/load": (self.cmd_load, "CKPT|N", "add a panel: a checkpoint or run folder, or a /models number"),
            "/drop": (self.cmd_drop, "N", "remove panel N"),
            "/params": (self.cmd_params, "[key=value ...]", "show or set generation settings"),
            "/history": (self.cmd_history, "[on|off]", "panels show the whole conversation, or the latest answer"),
            "/blind": (self.cmd_blind, "[on|off]", "hide which checkpoint is which: panels shuffled, titled A, B, …"),
            "/vote": (self.cmd_vote, "A|B|tie|bad [A C]",
                      f"which answer is better, into {self.votes.path} (a blind vote reveals the titles)"),
            "/reset": (self.cmd_reset, "", "clear every panel's history (in blind mode: a new round)"),
            "/help": (self.cmd_help, "", "this list"),
            "/quit": (None, "", "leave (also /exit, Ctrl-D)"),
        }

    # the loop

    def run(self) -> int:
        with self.ctrl_c.installed():
            self.io.message(f"{len(self.session.sides)} panel(s). Type a prompt, or /help.")
            while True:
                try:
                    line = self.io.prompt_for_input(PROMPT).strip()
                except EOFError:
                    return 0
                except KeyboardInterrupt:  # Ctrl-C at the line editor clears the line, as in a shell
                    continue
                if not line:
                    continue
                if not line.startswith("/"):
                    self.guard(self.ask, line, interruptible=False)  # Ctrl-C stops the answer, nothing else
                    continue
                name, _, arg = line.partition(" ")
                if name in ("/quit", "/exit"):
                    return 0
                if name not in self.commands:
                    self.io.error(f"unknown command {name} (/help lists the commands)")
                    continue
                self.guard(self.commands[name][0], arg.strip())

    def guard(self, fn, arg, interruptible: bool = True) -> None:
        try:
            with self.ctrl_c.command(interruptible):
                fn(arg)
        except StepwiseError as err:
            self.io.error(str(err))
        except KeyboardInterrupt:  # Ctrl-C outside an answer (loading, scoring) ends the command only
            self.io.error("interrupted")
        except Exception as err:  # a failure in one command must not end a comparison session
            self.io.error(f"{type(err).__name__}: {first_line(err)}")

    def load(self, path: str) -> None:
        """Load a panel's model, first making room in the cache for it and every other panel: each turn
        uses all of them, and a budget below their sum would evict and reload models on every prompt.
        Its weight files, doubled (bf16 weights load as fp32 on a CPU), bound its size before it loads."""
        cache = self.session.cache
        others = sum(self._sizes.get(s.path, 0) for s in self.session.sides if s.path != path)
        files = sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) if Path(path).is_dir() else 0
        cache.budget_bytes = max(cache.budget_bytes, others + 2 * files)
        self._sizes[path] = cache.get(path).nbytes

    # answering

    def title(self, side) -> str:
        """The catalogue's label (run, step, val loss, best), read once per checkpoint: a refresh of
        the panels must not touch the disk."""
        key = str(side.path)
        if key not in self._titles:
            self._titles[key] = checkpoint_label(side.path)
        return self._titles[key]

    def name(self, i: int, side) -> str:
        """Panel i's title: its letter alone while blind titles are hidden, else its number (its letter
        in blind mode) and the label."""
        if self.hidden:
            return letter(i)
        return f"{letter(i)} · {self.title(side)}" if self.blind else f"[{i + 1}] {self.title(side)}"

    def view(self, i: int, side, gen, conversation: list[dict]) -> PanelView:
        title = self.name(i, side)
        turn = self.turns(side)
        if side.error:
            return PanelView(title, side.error, "failed", failed=True)
        shown = conversation if self.show_history else []
        if gen is None:
            return PanelView(title, "", conversation=shown)
        if not gen.done:
            return PanelView(title, gen.text, f"{gen.new_tokens} tok…", conversation=shown)
        stop = "" if gen.finished else " · stopped" if self._stop.is_set() else " · hit max_new_tokens"
        return PanelView(title, gen.text, f"turn {turn} · {gen.new_tokens} tok · {gen.tokens_per_s:.0f} tok/s{stop}",
                         conversation=shown)

    def views(self, session, prompt: str, stop: StopFlag, extra=None):
        """Panel states while session answers prompt; extra(i, gen) adds lines once all are done."""
        before = [[*s.history, {"role": "user", "content": prompt}] for s in session.sides]
        last = []
        for last in session.stream_all(prompt, stop_event=stop):
            yield [self.view(i, s, g, before[i]) for i, (s, g) in enumerate(zip(session.sides, last))]
        if extra is not None:
            final = [self.view(i, s, g, before[i]) for i, (s, g) in enumerate(zip(session.sides, last))]
            for i, (v, g) in enumerate(zip(final, last)):
                if g is not None and not v.failed:
                    v.body = f"{v.body}\n\n{extra(i, g)}".rstrip()
            yield final

    @staticmethod
    def turns(side) -> int:
        return sum(1 for m in side.history if m.get("role") == "user")

    def stream(self, session, prompt: str, extra=None, stop: StopFlag | None = None) -> None:
        """Stream into the panels. Ctrl-C, once or more, sets the stop flag instead of raising: every side
        ends after its current token and keeps what it said (a KeyboardInterrupt inside the session's
        generator would drop the whole turn, and one in a panel's redraw could end the session)."""
        if not session.sides:
            raise StepwiseError("no panels: /load a checkpoint first (/models lists them)")
        self._stop = stop = stop or StopFlag()
        with self.ctrl_c.installed(), self.ctrl_c.answering(stop):
            self.io.stream_output(self.views(session, prompt, stop, extra))

    def ask(self, text: str) -> None:
        self.last_prompt = text
        self.turn += 1
        self.turn_settings = self.session.settings
        self.stream(self.session, text)

    # commands

    def cmd_help(self, _arg: str) -> None:
        width = max(len(f"{n} {u}") for n, (_, u, _) in self.commands.items())
        self.io.message("\n".join(f"  {f'{n} {u}':<{width}}  {h}" for n, (_, u, h) in self.commands.items()))

    def catalogue(self) -> list:
        return [c for run in list_runs(self.root) for c in run.checkpoints]

    def cmd_models(self, _arg: str) -> None:
        # While blind titles are hidden, which panel holds which checkpoint is not shown here either.
        loaded = {} if self.hidden else {Path(s.path).resolve(): i for i, s in enumerate(self.session.sides, 1)}
        rows = [[str(n), checkpoint_id(c.path), fmt(c.step), fmt(c.val_loss, 3), "best" if c.is_best else "",
                 str(loaded.get(c.path.resolve(), ""))] for n, c in enumerate(self.catalogue(), 1)]
        if not rows:
            raise StepwiseError(f"{self.root}: no runs with checkpoints (run `make train` first)")
        self.io.table(f"checkpoints under {self.root}", ["#", "checkpoint", "step", "val_loss", "", "panel"], rows)

    def cmd_load(self, arg: str) -> None:
        if not arg:
            raise StepwiseError("usage: /load CKPT (a folder, run/step-000500, or a number from /models)")
        if arg.isdigit():
            found = self.catalogue()
            if not 1 <= int(arg) <= len(found):
                raise StepwiseError(f"/load {arg}: /models lists {len(found)} checkpoints")
            paths = [found[int(arg) - 1].path]
        else:
            paths = resolve(arg, self.root)
        for path in paths:
            self.load(str(path))  # now: a broken folder fails here, with its name
            i = self.session.add(str(path))
            if not self.blind:
                self.io.message(f"panel {i + 1}: {self.title(self.session.sides[i])}")
        if self.blind:  # its title would give it away: every panel is shuffled and hidden again
            self.new_round()
            self.io.message(f"{len(paths)} panel(s) added; new blind round: {self.letters()} reshuffled, "
                            "conversations cleared")

    def cmd_drop(self, arg: str) -> None:
        self.session.drop(panel_index(arg, len(self.session.sides), "/drop N"))
        self.io.message(f"dropped panel {arg}; {len(self.session.sides)} left")

    def cmd_params(self, arg: str) -> None:
        if arg:
            try:
                settings = parse_settings(self.session.settings, shlex.split(arg))
            except StepwiseError as err:  # the settings' own checks name CLI flags; say where it came from
                raise StepwiseError(f"/params: {str(err).removeprefix('/params: ').removeprefix('--')}") from None
            cap = self.max_new_tokens
            if settings.max_new_tokens > cap:  # as the web app clamps what a client asks for, but said
                self.io.message(f"/params: max_new_tokens {settings.max_new_tokens} is above this session's cap; "
                                f"using {cap} (start with --max_new_tokens N for another cap)")
                settings = dataclasses.replace(settings, max_new_tokens=cap)
            self.session.settings = settings
        s = self.session.settings
        self.io.message("  ".join(f"{f.name}={getattr(s, f.name)}" for f in dataclasses.fields(s)))

    def prompts(self) -> list[HeldoutPrompt]:
        if self._prompts is None:
            self._prompts = load_prompts(self.prompts_path)
        return self._prompts

    def cmd_reset(self, _arg: str) -> None:
        if self.blind:
            self.new_round()
            self.io.message(f"histories cleared; new blind round: {self.letters()} reshuffled, titles hidden")
            return
        self.session.reset()
        self.last_prompt = None
        self.io.message("histories cleared")

    def cmd_history(self, arg: str) -> None:
        self.show_history = on_off(arg, self.show_history, "/history")
        self.io.message("history on: panels show the whole conversation" if self.show_history
                        else "history off: panels show the latest answer")

    # blind comparison and votes

    def letters(self) -> str:
        return ", ".join(letter(i) for i in range(len(self.session.sides)))

    def new_round(self) -> None:
        """Titles hidden, panels shuffled, conversations cleared: an earlier answer on screen beside its
        title would tell which panel is which."""
        self.blind = self.hidden = True
        self.shuffler.shuffle(self.session.sides)
        self.session.reset()
        self.last_prompt = None

    def reveal(self) -> str:
        self.hidden = False
        return "revealed: " + ", ".join(f"{letter(i)} = {self.title(s)}" for i, s in enumerate(self.session.sides))

    def cmd_blind(self, arg: str) -> None:
        if not on_off(arg, self.blind, "/blind"):
            shown = self.reveal() if self.hidden else ""
            self.blind = False
            self.io.message(f"blind off{'; ' + shown if shown else ''}")
            return
        if len(self.session.sides) < 2:
            raise StepwiseError("/blind: load at least two panels to compare (/load)")
        self.new_round()
        self.io.message(f"blind: panels {self.letters()} in a shuffled order, titles hidden, conversations cleared; "
                        "/vote reveals them, /reset starts a new round, /blind off leaves")

    def vote_id(self, path) -> str:
        """A checkpoint as votes name it: relative to the root, as the web app's are; one outside the root
        by run/folder (an absolute path would put the user's home folder into the votes file)."""
        p, root = Path(path).resolve(), self.root.resolve()
        return p.relative_to(root).as_posix() if p.is_relative_to(root) and p != root else checkpoint_id(p)

    def heldout_key(self, prompt: str) -> str | None:
        try:
            return next((p.key for p in self.prompts() if p.prompt.strip() == prompt.strip()), None)
        except StepwiseError:  # no prompt file: the prompt was typed
            return None

    def cmd_vote(self, arg: str) -> None:
        sides = self.session.sides
        if len(sides) < 2:
            raise StepwiseError("/vote: load two panels to compare (/load)")
        i, j, outcome = parse_vote(arg, len(sides))
        a, b = sides[i], sides[j]
        for k, s in ((i, a), (j, b)):
            if s.error or len(s.history) < 2 or s.history[-1]["role"] != "assistant":
                raise StepwiseError(f"/vote: panel {letter(k)} has no answer to vote on (type a prompt first)")
        pair = f"{letter(i)} and {letter(j)}"
        prompt = a.history[-2]["content"]
        if b.history[-2]["content"] != prompt:
            raise StepwiseError(f"/vote: panels {pair} last answered different prompts")
        if (self.turn, i, j) in self.voted:
            raise StepwiseError(f"/vote: {pair} already have a vote for these answers")
        if not self.root.is_dir():
            raise StepwiseError(f"/vote: {self.root} is not a folder (votes are kept in --root's votes.jsonl)")
        self.votes.append(Vote(
            a=self.vote_id(a.path), b=self.vote_id(b.path), outcome=outcome, prompt=prompt,
            answers=[a.history[-1]["content"], b.history[-1]["content"]], key=self.heldout_key(prompt),
            settings=dataclasses.asdict(self.turn_settings or self.session.settings),
            histories=[list(a.history[:-1]), list(b.history[:-1])], blind=self.hidden))
        self.voted.add((self.turn, i, j))
        verdict = {"a": f"{letter(i)} better than {letter(j)}", "b": f"{letter(j)} better than {letter(i)}",
                   "tie": f"{pair}: a tie", "both_bad": f"{pair}: both bad"}[outcome]
        self.io.message(f"vote recorded in {self.votes.path}{' (blind)' if self.hidden else ''}: {verdict}")
        if self.hidden:
            self.io.message(self.reveal())


def parse_settings(base: GenerationSettings, pairs: list[str]) -> GenerationSettings:
    """key=value words into a new GenerationSettings; its own checks name a bad value."""
    types = {f.name: str(f.type) for f in dataclasses.fields(base)}
    changes = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or key not in types:
            raise StepwiseError(f"/params: expected key=value with key one of {', '.join(types)}, got {pair!r}")
        whole = types[key].startswith("int")
        try:
            if "None" in types[key] and value.lower() in ("none", "null", ""):
                changes[key] = None
            else:
                changes[key] = (int if whole else float)(value)
        except ValueError:
            raise StepwiseError(f"/params: {key} must be a {'whole ' if whole else ''}number, got {value!r}") from None
    return dataclasses.replace(base, **changes)
