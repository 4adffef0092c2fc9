"""The REPL's loop: panels over a comparison session, the commands, and their Tab completion.

`python -m app.repl` (app/repl.py) starts it; what a person sees goes through a ChatIO (app/chatio.py).
Held-out answers are scored by trainer.evals.heldout, as everywhere else; checkpoints are named by
trainer.core.catalog's label.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shlex
import signal
import threading
from pathlib import Path

from prompt_toolkit.completion import Completer, Completion

from app.catalog import checkpoint_id, fmt, spread
from app.chatio import ChatIO, PanelView
from app.session import CompareSession
from trainer.core.catalog import checkpoint_label, is_checkpoint, list_runs, read_run
from trainer.core.errors import StepwiseError, first_line
from trainer.evals import registry, scoring
from trainer.evals.heldout import score_generation, summarize_rows
from trainer.evals.prompts import HeldoutPrompt, check_instruction, load_prompts
from trainer.inference.generate import GenerationSettings

MAX_PANELS = 4
PROMPT = "you> "
METRICS = (*scoring.SUMMARY_METRICS, "mean_length", "distinct_2", "eos_rate")


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


# --- formatting ----------------------------------------------------------------------------------

def marks(flags: list[bool]) -> str:
    return "".join("✓" if f else "✗" for f in flags)


def check_lines(p: HeldoutPrompt, result: dict) -> str:
    lines = [f"{'✓' if s else '✗'} {i}" + ("" if s == lo else " (loose ✓)")
             for i, s, lo in zip(p.instruction_id_list, result["strict"], result["loose"])]
    if result["rougeL"] is not None:
        lines.append(f"rougeL {result['rougeL']:.3f}")
    return "\n".join(lines)


def summary_row(name: str, s: dict) -> list[str]:
    return [name, str(s["n"])] + [fmt(s[m], 3) for m in METRICS]


# --- the loop ------------------------------------------------------------------------------------

class Repl:
    """The chat loop: owns the session (histories) and the commands; shows everything through a ChatIO."""

    def __init__(self, session, io: ChatIO, root: Path, prompts_path: str, seed: int | None = None):
        self.session, self.io, self.root, self.prompts_path = session, io, root, prompts_path
        self._prompts: list[HeldoutPrompt] | None = None
        self._titles: dict[str, str] = {}
        self._sizes: dict[str, int] = {}  # parameter bytes of each model loaded, by path
        self._stop = threading.Event()  # the current answer's; set by Ctrl-C
        self.rng = random.Random(seed)
        self.last_prompt: str | None = None
        self.commands = {
            "/models": (self.cmd_models, "", "checkpoints under the root (their numbers work with /load)"),
            "/load": (self.cmd_load, "CKPT|N", "add a panel: a checkpoint or run folder, or a /models number"),
            "/drop": (self.cmd_drop, "N", "remove panel N"),
            "/params": (self.cmd_params, "[key=value ...]", "show or set generation settings"),
            "/heldout": (self.cmd_heldout, "[N]", "N random held-out prompts (default 3), checked and scored"),
            "/score": (self.cmd_score, "[KEY | ID [k=v ...]]",
                       "check the last answers (default: against the held-out prompt just typed)"),
            "/reset": (self.cmd_reset, "", "clear every panel's history"),
            "/save": (self.cmd_save, "FILE", "write the transcript (.json as JSON, anything else Markdown)"),
            "/help": (self.cmd_help, "", "this list"),
            "/quit": (None, "", "leave (also /exit, Ctrl-D)"),
        }

    # the loop

    def run(self) -> int:
        self.io.message(f"{len(self.session.sides)} panel(s). Type a prompt, or /help.")
        while True:
            try:
                line = self.io.prompt_for_input(PROMPT).strip()
            except EOFError:
                return 0
            except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line, as in a shell
                continue
            if not line:
                continue
            if not line.startswith("/"):
                self.guard(self.ask, line)
                continue
            name, _, arg = line.partition(" ")
            if name in ("/quit", "/exit"):
                return 0
            if name not in self.commands:
                self.io.error(f"unknown command {name} (/help lists the commands)")
                continue
            self.guard(self.commands[name][0], arg.strip())

    def guard(self, fn, arg) -> None:
        try:
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

    def view(self, i: int, side, gen) -> PanelView:
        title = f"[{i + 1}] {self.title(side)}"
        turn = self.turns(side)
        if side.error:
            return PanelView(title, side.error, "failed", failed=True)
        if gen is None:
            return PanelView(title, "")
        if not gen.done:
            return PanelView(title, gen.text, f"{gen.new_tokens} tok…")
        stop = "" if gen.finished else " · stopped" if self._stop.is_set() else " · hit max_new_tokens"
        return PanelView(title, gen.text, f"turn {turn} · {gen.new_tokens} tok · {gen.tokens_per_s:.0f} tok/s{stop}")

    def views(self, session, prompt: str, stop: threading.Event, extra=None):
        """Panel states while session answers prompt; extra(i, gen) adds lines once all are done."""
        last = []
        for last in session.stream_all(prompt, stop_event=stop):
            yield [self.view(i, s, g) for i, (s, g) in enumerate(zip(session.sides, last))]
        if extra is not None:
            final = [self.view(i, s, g) for i, (s, g) in enumerate(zip(session.sides, last))]
            for i, (v, g) in enumerate(zip(final, last)):
                if g is not None and not v.failed:
                    v.body = f"{v.body}\n\n{extra(i, g)}".rstrip()
            yield final

    @staticmethod
    def turns(side) -> int:
        return sum(1 for m in side.history if m.get("role") == "user")

    def stream(self, session, prompt: str, extra=None) -> None:
        """Stream into the panels. Ctrl-C sets the stop event instead of raising: every side ends after
        its current token and keeps what it said (a KeyboardInterrupt inside the session's generator
        would drop the whole turn). A second Ctrl-C raises as usual."""
        if not session.sides:
            raise StepwiseError("no panels: /load a checkpoint first (/models lists them)")
        stop = threading.Event()
        self._stop = stop
        restore = None
        if threading.current_thread() is threading.main_thread():
            def on_sigint(signum, frame):
                if stop.is_set():
                    raise KeyboardInterrupt
                stop.set()
            restore = signal.signal(signal.SIGINT, on_sigint)
        try:
            self.io.stream_output(self.views(session, prompt, stop, extra))
        except KeyboardInterrupt:
            self.io.error("interrupted; this turn is not kept")
        finally:
            if restore is not None:
                signal.signal(signal.SIGINT, restore)

    def ask(self, text: str) -> None:
        self.last_prompt = text
        self.stream(self.session, text)

    # commands

    def cmd_help(self, _arg: str) -> None:
        width = max(len(f"{n} {u}") for n, (_, u, _) in self.commands.items())
        self.io.message("\n".join(f"  {f'{n} {u}':<{width}}  {h}" for n, (_, u, h) in self.commands.items()))

    def catalogue(self) -> list:
        return [c for run in list_runs(self.root) for c in run.checkpoints]

    def cmd_models(self, _arg: str) -> None:
        loaded = {Path(s.path).resolve(): i for i, s in enumerate(self.session.sides, 1)}
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
            self.io.message(f"panel {i + 1}: {self.title(self.session.sides[i])}")

    def cmd_drop(self, arg: str) -> None:
        n = len(self.session.sides)
        if not arg.isdigit() or not 1 <= int(arg) <= n:
            raise StepwiseError(f"/drop N: N is a panel number, 1 to {n}")
        self.session.drop(int(arg) - 1)
        self.io.message(f"dropped panel {arg}; {len(self.session.sides)} left")

    def cmd_params(self, arg: str) -> None:
        if arg:
            try:
                self.session.settings = parse_settings(self.session.settings, shlex.split(arg))
            except StepwiseError as err:  # the settings' own checks name CLI flags; say where it came from
                raise StepwiseError(f"/params: {str(err).removeprefix('/params: ')}") from None
        s = self.session.settings
        self.io.message("  ".join(f"{f.name}={getattr(s, f.name)}" for f in dataclasses.fields(s)))

    def prompts(self) -> list[HeldoutPrompt]:
        if self._prompts is None:
            self._prompts = load_prompts(self.prompts_path)
        return self._prompts

    def cmd_heldout(self, arg: str) -> None:
        if arg and (not arg.isdigit() or int(arg) < 1):
            raise StepwiseError(f"/heldout N: N is a positive number, got {arg!r}")
        pool = self.prompts()
        chosen = self.rng.sample(pool, min(int(arg or 3), len(pool)))
        # A scratch session: each held-out prompt is answered on its own, and the chat's histories stay.
        scratch = CompareSession([s.path for s in self.session.sides], cache=self.session.cache,
                                 settings=self.session.settings)
        results = [[] for _ in scratch.sides]
        for k, p in enumerate(chosen, 1):
            self.io.message(f"held-out {k}/{len(chosen)} [{p.key}] {p.prompt}")
            scratch.reset()

            def extra(i, gen, p=p):
                row = score_generation(p, gen)
                results[i].append(row)
                return check_lines(p, row)

            self.stream(scratch, p.prompt, extra)
            if self._stop.is_set():  # Ctrl-C ends the whole run; what was answered is still scored
                self.io.message(f"stopped after {k} of {len(chosen)} prompts")
                break
        rows = [summary_row(f"[{i}] {self.title(s)}", summarize_rows(r))
                for i, (s, r) in enumerate(zip(scratch.sides, results), 1) if r]
        self.io.table(f"held-out scores ({k} prompt(s) from {self.prompts_path})",
                      ["checkpoint", "n", *METRICS], rows)

    def score_target(self, arg: str) -> HeldoutPrompt:
        words = shlex.split(arg)
        if not words:
            match = [p for p in self.prompts() if p.prompt.strip() == (self.last_prompt or "").strip()]
            if not match:
                raise StepwiseError("/score: the last prompt is not a held-out prompt; give /score KEY or "
                                    "/score INSTRUCTION_ID [key=value ...]")
            return match[0]
        if ":" not in words[0]:
            match = [p for p in self.prompts() if p.key == words[0]]
            if not match:
                raise StepwiseError(f"/score {words[0]}: no such key in {self.prompts_path}")
            return match[0]
        ids, kwargs = [], []
        for w in words:
            if "=" in w and ids:
                k, _, v = w.partition("=")
                kwargs[-1][k] = int(v) if v.lstrip("-").isdigit() else v
            elif w in registry.instruction_registry():
                ids.append(w)
                kwargs.append({})
            else:
                raise StepwiseError(f"/score: {w!r} is not an IFEval instruction id (or key=value after one)")
        p = HeldoutPrompt("typed", self.last_prompt or "", ids, kwargs)
        for i, kw in zip(ids, kwargs):
            check_instruction(i, kw, p.prompt, "/score")
        return p

    def cmd_score(self, arg: str) -> None:
        answered = [s for s in self.session.sides if s.last is not None]
        if not answered:
            raise StepwiseError("/score: no answers yet; type a prompt first")
        p = self.score_target(arg)
        rows = []
        for i, s in enumerate(self.session.sides, 1):
            if s.last is None:
                rows.append([f"[{i}] {self.title(s)}", "-", "-", "-", "-"])
                continue
            r = scoring.score_response(p, s.last.text)
            rows.append([f"[{i}] {self.title(s)}", marks(r["strict"]) or "-", marks(r["loose"]) or "-",
                         fmt(r["rougeL"], 3), str(r["length"])])
        self.io.table(f"/score against {p.key}: {', '.join(p.instruction_id_list) or 'reference only'}",
                      ["checkpoint", "strict", "loose", "rougeL", "words"], rows)

    def cmd_reset(self, _arg: str) -> None:
        self.session.reset()
        self.last_prompt = None
        self.io.message("histories cleared")

    def cmd_save(self, arg: str) -> None:
        if not arg:
            raise StepwiseError("usage: /save FILE (.json for JSON, anything else Markdown)")
        path = Path(arg).expanduser()
        panels = [{"checkpoint": str(s.path), "label": self.title(s), "history": list(s.history)}
                  for s in self.session.sides]
        settings = dataclasses.asdict(self.session.settings)
        if path.suffix.lower() == ".json":
            text = json.dumps({"settings": settings, "panels": panels}, indent=2, ensure_ascii=False) + "\n"
        else:
            text = transcript_markdown(panels, settings)
        try:
            path.write_text(text, encoding="utf-8")
        except OSError as err:
            raise StepwiseError(f"/save {arg}: {err.strerror}") from None
        self.io.message(f"saved {len(panels)} panel(s) to {path}")


def transcript_markdown(panels: list[dict], settings: dict) -> str:
    out = ["# Stepwise transcript", "", "Settings: " + ", ".join(f"`{k}={v}`" for k, v in settings.items()), ""]
    for i, p in enumerate(panels, 1):
        out += [f"## [{i}] {p['label']}", "", f"`{p['checkpoint']}`", ""]
        for m in p["history"]:
            out += [f"**{m['role']}:**", "", m["content"], ""]
    return "\n".join(out)


def parse_settings(base: GenerationSettings, pairs: list[str]) -> GenerationSettings:
    """key=value words into a new GenerationSettings; its own checks name a bad value."""
    types = {f.name: str(f.type) for f in dataclasses.fields(base)}
    changes = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or key not in types:
            raise StepwiseError(f"/params: expected key=value with key one of {', '.join(types)}, got {pair!r}")
        try:
            if "None" in types[key] and value.lower() in ("none", "null", ""):
                changes[key] = None
            else:
                changes[key] = (int if types[key].startswith("int") else float)(value)
        except ValueError:
            raise StepwiseError(f"/params: {key} must be a number, got {value!r}") from None
    return dataclasses.replace(base, **changes)


class CommandCompleter(Completer):
    """Tab completion: command names, then each command's own words (checkpoints, keys, setting names)."""

    def __init__(self, repl: Repl):
        self.repl = repl

    def get_completions(self, document, complete_event):
        text = document.text_before_cursor
        if not text.startswith("/"):
            return
        if " " not in text:
            word, options = text, [*self.repl.commands, "/exit"]
        else:
            name, _, rest = text.partition(" ")
            word, options = rest.split(" ")[-1], self.options(name)
        for o in options:
            if o.startswith(word):
                yield Completion(o, start_position=-len(word))

    def options(self, name: str) -> list[str]:
        repl = self.repl
        try:
            if name == "/load":
                return [checkpoint_id(c.path) for c in repl.catalogue()]
            if name == "/drop":
                return [str(i) for i in range(1, len(repl.session.sides) + 1)]
            if name == "/params":
                return [f"{f.name}=" for f in dataclasses.fields(GenerationSettings)]
            if name == "/score":
                return [p.key for p in repl.prompts()] + sorted(registry.instruction_registry())
        except StepwiseError:  # a missing prompt file just means nothing to complete
            pass
        return []
