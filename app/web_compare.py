"""Compare tab: 2 to 4 columns, each a checkpoint with its own conversation, one prompt streamed to all
at once; a random held-out prompt with its constraints, scores under each answer; votes and ratings
(open and blind votes apart). Blind mode (app.web_blind) hides which column holds which checkpoint
until a vote.

The comparison itself is app.session.CompareSession (one Side per column, shared with the REPL); this
module only renders it. Components live in named per-column lists and handlers return
{component: value} dicts, so no handler depends on a long positional wiring (FastChat's
gradio_block_arena_named.py, without its copy per side).
"""

from __future__ import annotations

import dataclasses
import functools
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from app.session import CompareSession, ModelCache
from app.votes import OUTCOME_LABELS, RATING_HEADERS, Vote, VoteStore, ratings_tables
from app.web_blind import BlindMode, BlindRound
from app.web_common import (
    MAX_SIDES,
    MIN_SIDES,
    SIDE_NAMES,
    WebConfig,
    check_prompt,
    constraints_html,
    esc,
    inside_root,
    prompt_file_choices,
    public,
    rel,
    resolve_prompt_file,
    scores_html,
    settings_from,
    user_error,
)
from trainer.core.errors import StepwiseError
from trainer.evals.heldout import score_generation
from trainer.evals.prompts import HeldoutPrompt, load_prompts
from trainer.evals.scoring import words
from trainer.inference.generate import Generation, GenerationSettings


@dataclass
class Browser:
    """One browser tab's comparison, kept in a gr.State (created on its first event)."""

    session: CompareSession
    """One Side per column: checkpoint, history, last answer, error."""
    stop: threading.Event = field(default_factory=threading.Event)
    """Set by Stop; every side's generation ends after its current token."""
    busy: threading.Lock = field(default_factory=threading.Lock)
    """Held while this tab streams: a second Send waits for Stop instead of interleaving turns."""
    heldout: HeldoutPrompt | None = None
    """The held-out prompt last drawn, scored when it is the prompt sent."""
    scores: list[dict | None] = field(default_factory=list)
    """Per column: the last answer's held-out scores."""
    notes: list[str | None] = field(default_factory=list)
    """Per column: why its pick could not be used."""
    turn: int = 0
    """Completed rounds, so a vote is counted once per answer pair."""
    voted: set = field(default_factory=set)
    blind: BlindRound | None = None
    """The blind round, while Blind is on."""

    @property
    def hidden(self) -> bool:
        """Blind and not yet revealed: nothing shown may say which checkpoint a column holds."""
        return self.blind is not None and not self.blind.revealed


def set_pick(cfg: WebConfig, browser: Browser, i: int, pick) -> str | None:
    """Put column i on pick (adding empty columns up to it). A changed pick starts that column's
    conversation afresh; a value that is not under the root leaves the side empty, with a note.
    Returns the path the side now has."""
    s = browser.session
    while len(s.sides) <= i:
        s.add(None)
    n = len(s.sides)
    browser.notes = (browser.notes + [None] * n)[:n]
    browser.scores = (browser.scores + [None] * n)[:n]
    try:
        path, browser.notes[i] = str(inside_root(cfg.root, pick, "checkpoint")), None
    except StepwiseError as err:
        path, browser.notes[i] = None, public(cfg.root, err)
    if s.sides[i].path != path:
        s.set_side(i, path)
        browser.scores[i] = None
    return path


def sync_sides(cfg: WebConfig, browser: Browser, picks: list) -> None:
    """Make the session's sides match the columns' picks (set_pick for each)."""
    s = browser.session
    while len(s.sides) > len(picks):
        s.drop(len(s.sides) - 1)
    for i, pick in enumerate(picks):
        set_pick(cfg, browser, i, pick)


def stats_text(gen: Generation | None, side, note: str | None, root: Path, hidden: bool = False) -> str:
    """A column's speed, length and stop reason, or its error (without the root's path; while blind,
    without the error, which would name the checkpoint)."""
    if (note or side.error) and hidden:
        return "**Error:** this column's hidden checkpoint could not answer (turn Blind off to see which and why)"
    if note:
        return f"**Error:** {note}"
    if side.error:
        return f"**Error:** {public(root, side.error)}"
    if gen is None:
        return ""
    state = "" if not gen.done else (" · stopped at end of answer" if gen.finished else " · cut at max new tokens")
    return (f"{gen.tokens_per_s:.1f} tokens/s · {gen.new_tokens} tokens · {len(words(gen.text))} words"
            f"{state}{' · streaming…' if not gen.done else ''}")


class CompareTab:
    """Builds the tab; the per-column components are in the lists `columns`, `pickers`, `chats`,
    `stats`, `scores`."""

    def __init__(self, cfg: WebConfig, cache: ModelCache, votes: VoteStore):
        self.cfg, self.cache, self.votes = cfg, cache, votes
        self._prompt_files: dict[str, tuple[int, list[HeldoutPrompt]]] = {}
        self.state = gr.State(None)
        with gr.Row():
            self.n_sides = gr.Radio([2, 3, 4], value=MIN_SIDES, label="Columns", elem_id="n-sides", scale=1)
            self.blind = BlindMode(self)
            self.refresh = gr.Button("Refresh checkpoint lists", scale=0, elem_id="refresh")
        self.blind.add_status()
        self.columns, self.pickers, self.chats, self.stats, self.scores = [], [], [], [], []
        with gr.Row(equal_height=False):
            for i in range(MAX_SIDES):
                with gr.Column(visible=i < MIN_SIDES, min_width=260) as col:
                    self.columns.append(col)
                    self.pickers.append(gr.Dropdown(label=f"{SIDE_NAMES[i]}: checkpoint", choices=[],
                                                    allow_custom_value=True, elem_id=f"pick-{i}"))
                    self.chats.append(gr.Chatbot(label=SIDE_NAMES[i], height=340, elem_id=f"chat-{i}",
                                                 buttons=["copy"], feedback_options=None))
                    self.stats.append(gr.Markdown(elem_id=f"stats-{i}"))
                    self.scores.append(gr.HTML(elem_id=f"scores-{i}"))
        with gr.Row():
            self.prompt = gr.Textbox(label="Prompt (sent to every column)", lines=3, scale=5,
                                     max_length=cfg.max_prompt_chars, elem_id="prompt")
            with gr.Column(scale=1, min_width=160):
                self.send = gr.Button("Send", variant="primary", elem_id="send")
                self.stop = gr.Button("Stop", variant="stop", elem_id="stop")
        with gr.Row():
            self.regen = gr.Button("Regenerate", elem_id="regenerate")
            self.clear = gr.Button("Clear", elem_id="clear")
            files = prompt_file_choices(cfg)
            self.prompt_file = gr.Dropdown(files, value=files[0] if files else None, label="Held-out prompt file",
                                           elem_id="prompt-file", scale=2)
            self.draw = gr.Button("Random held-out prompt", elem_id="draw")
        self.heldout = gr.HTML(elem_id="heldout")
        with gr.Accordion("Generation settings (greedy by default, so comparisons are fair)", open=False):
            with gr.Row():
                self.temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)")
                self.top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
                self.max_new = gr.Slider(1, cfg.max_new_tokens, value=min(128, cfg.max_new_tokens), step=1,
                                         label=f"Max new tokens (at most {cfg.max_new_tokens})", elem_id="max-new")
                self.seed = gr.Number(value=0, precision=0, label="Seed")
        gr.Markdown("### Vote")
        with gr.Row():
            self.vote_a = gr.Dropdown(list(SIDE_NAMES[:MIN_SIDES]), value="A", label="Compare column",
                                      elem_id="vote-first", scale=1)
            self.vote_b = gr.Dropdown(list(SIDE_NAMES[:MIN_SIDES]), value="B", label="with column",
                                      elem_id="vote-second", scale=1)
            self.vote_buttons = {o: gr.Button(f"{label}", elem_id=f"vote-{o.replace('_', '-')}", scale=1)
                                 for o, label in OUTCOME_LABELS.items()}
        self.vote_status = gr.Markdown(elem_id="vote-status")
        with gr.Row(equal_height=False):
            self.ratings = gr.Dataframe(headers=RATING_HEADERS, interactive=False, elem_id="ratings",
                                        label="Ratings from open votes (Bradley-Terry, Elo scale) and votes")
            self.ratings_blind = gr.Dataframe(headers=RATING_HEADERS, interactive=False, elem_id="ratings-blind",
                                              label="Ratings from blind votes, fitted apart")
        self._wire()

    # --- rendering -----------------------------------------------------------------------------

    def render(self, browser: Browser, snaps: list[Generation | None] | None = None) -> dict:
        """{component: value} for every shown column, from the session (and the streaming snapshots)."""
        out: dict = {self.state: browser}
        for i, side in enumerate(browser.session.sides):
            gen = snaps[i] if snaps is not None else side.last
            messages = list(side.history)
            if snaps is not None and messages and messages[-1]["role"] == "user":
                messages.append({"role": "assistant", "content": gen.text if gen is not None else "…"})
            note = browser.notes[i] if i < len(browser.notes) else None
            out[self.chats[i]] = messages
            out[self.stats[i]] = stats_text(gen, side, note, self.cfg.root, browser.hidden)
            out[self.scores[i]] = scores_html(browser.scores[i] if i < len(browser.scores) else None)
        return out

    def browser(self, state) -> Browser:
        if isinstance(state, Browser):
            return state
        return Browser(CompareSession(cache=self.cache, root=self.cfg.root))

    # --- handlers ------------------------------------------------------------------------------

    def _picks(self, data: dict, browser: Browser | None = None) -> list:
        """The columns' checkpoints: the pickers', or the hidden draw's while blind."""
        if browser is not None and browser.hidden:
            return list(browser.blind.drawn)
        n = int(data[self.n_sides] or MIN_SIDES)
        return [data[p] for p in self.pickers[: max(MIN_SIDES, min(n, MAX_SIDES))]]

    def _settings(self, data: dict) -> GenerationSettings:
        return settings_from(self.cfg, data[self.temperature], data[self.top_p], data[self.max_new], data[self.seed])

    def _rounds(self, browser: Browser, start, heldout: HeldoutPrompt | None):
        """Run one round on every side, yielding renders; score the answers when the prompt is held
        out. `start()` syncs the sides and returns the round's iterator; it runs under the tab's lock,
        so a second Send cannot rearrange the sides of a round in flight."""
        if not browser.busy.acquire(blocking=False):
            raise user_error("Still answering the last prompt: press Stop first.")
        try:
            rounds = start()
            browser.stop.clear()
            browser.scores = [None] * len(browser.session.sides)
            for snaps in rounds:
                yield self.render(browser, snaps)
            browser.turn += 1
            if heldout is not None:
                browser.scores = [score_generation(heldout, s.last) if s.last and s.error is None and
                                  len(s.history) >= 2 and s.history[-2]["content"] == heldout.prompt else None
                                  for s in browser.session.sides]
            yield self.render(browser)
        except StepwiseError as err:
            raise user_error(public(self.cfg.root, err)) from None
        finally:
            browser.busy.release()

    def _start(self, browser: Browser, data: dict, ask):
        def start():
            sync_sides(self.cfg, browser, self._picks(data, browser))
            browser.session.settings = self._settings(data)
            return ask()
        return start

    def on_send(self, data: dict):
        prompt = check_prompt(self.cfg, data[self.prompt])
        browser = self.browser(data[self.state])
        heldout = browser.heldout if browser.heldout is not None and browser.heldout.prompt == prompt else None
        start = self._start(browser, data, lambda: browser.session.stream_all(prompt, browser.stop))
        for update in self._rounds(browser, start, heldout):
            yield {**update, self.prompt: ""}

    def on_regenerate(self, data: dict):
        browser = self.browser(data[self.state])
        start = self._start(browser, data, lambda: browser.session.regenerate(browser.stop))
        yield from self._rounds(browser, start, browser.heldout)

    def on_stop(self, state):
        if isinstance(state, Browser):
            state.stop.set()

    def on_clear(self, state):
        browser = self.browser(state)
        if browser.busy.locked():
            raise user_error("Still answering: press Stop first.")
        browser.session.reset()
        browser.scores = [None] * len(browser.session.sides)
        browser.voted.clear()
        out = self.render(browser)
        for i in range(MAX_SIDES):
            out.update({self.chats[i]: [], self.stats[i]: "", self.scores[i]: ""})
        return {**out, self.vote_status: ""}

    def on_clear_side(self, i: int, state):
        """The chat's own trash button: forget this column's conversation only."""
        browser = self.browser(state)
        if browser.busy.locked():
            raise user_error("Still answering: press Stop first.")
        if i < len(browser.session.sides):
            side = browser.session.sides[i]
            side.history, side.last, side.error = [], None, None
            browser.scores = [None if j == i else sc for j, sc in enumerate(browser.scores)]
        return {self.state: browser, self.stats[i]: "", self.scores[i]: ""}

    def on_pick(self, i: int, state, pick):
        """A column switched checkpoints: its conversation starts afresh (the model loads at Send)."""
        browser = self.browser(state)
        if browser.busy.locked() or browser.hidden:  # the next Send picks it up; while blind, the draw holds
            return {self.state: browser}
        path = set_pick(self.cfg, browser, i, pick)
        note = browser.notes[i]
        browser.scores[i] = None
        cached = path is not None and path in self.cache
        return {self.state: browser, self.chats[i]: browser.session.sides[i].history,
                self.stats[i]: f"**Error:** {note}" if note else ("loaded (cached)" if cached else ""),
                self.scores[i]: ""}

    def on_sides(self, n):
        n = max(MIN_SIDES, min(int(n or MIN_SIDES), MAX_SIDES))
        letters = list(SIDE_NAMES[:n])
        return {**{c: gr.Column(visible=i < n) for i, c in enumerate(self.columns)},
                self.vote_a: gr.Dropdown(choices=letters), self.vote_b: gr.Dropdown(choices=letters)}

    def on_draw(self, state, name):
        try:
            prompts = self.heldout_prompts(name)
        except StepwiseError as err:
            raise user_error(err) from None
        browser = self.browser(state)
        p = random.Random().choice(prompts)
        browser.heldout = p
        head = f"<p><b>Held-out prompt {esc(p.key)}</b>{' · ' + esc(p.category) if p.category else ''}</p>"
        return {self.state: browser, self.prompt: p.prompt,
                self.heldout: head + constraints_html(p.instruction_id_list, p.kwargs, p.reference)}

    def on_vote(self, outcome: str, state, a_name, b_name):
        if not isinstance(state, Browser):
            raise user_error("Send a prompt first, then vote on the answers.")
        sides = state.session.sides
        try:
            a, b = SIDE_NAMES.index(a_name), SIDE_NAMES.index(b_name)
        except ValueError:
            raise user_error("Pick two columns to vote between.") from None
        if a == b:
            raise user_error("Pick two different columns.")
        if max(a, b) >= len(sides):
            raise user_error(f"Column {SIDE_NAMES[max(a, b)]} has no answer yet.")
        sa, sb = sides[a], sides[b]
        answered = [len(s.history) >= 2 and s.history[-1]["role"] == "assistant" for s in (sa, sb)]
        if not all(answered) or sa.history[-2]["content"] != sb.history[-2]["content"]:
            raise user_error(f"Columns {a_name} and {b_name} need answers to the same prompt first.")
        if sa.path == sb.path:
            raise user_error(f"Columns {a_name} and {b_name} show the same checkpoint.")
        key = (state.turn, a, b)
        if key in state.voted or (state.turn, b, a) in state.voted:
            raise user_error("Already voted on these two answers.")
        prompt = sa.history[-2]["content"]
        held = state.heldout.key if state.heldout is not None and state.heldout.prompt == prompt else None
        try:
            vote = Vote(rel(self.cfg.root, Path(sa.path)), rel(self.cfg.root, Path(sb.path)), outcome, prompt=prompt,
                        answers=[sa.history[-1]["content"], sb.history[-1]["content"]], key=held,
                        settings=dataclasses.asdict(state.session.settings),
                        histories=[sa.history[:-1], sb.history[:-1]], blind=state.hidden)
        except StepwiseError as err:
            raise user_error(err) from None
        self.votes.append(vote)
        state.voted.add(key)
        out = {self.state: state, **self.ratings_value(),
               self.vote_status: f"Recorded{' blind' if vote.blind else ''}: {OUTCOME_LABELS[outcome]} "
                                 f"({a_name} = {vote.a}, {b_name} = {vote.b})."}
        if vote.blind:  # the vote is in: show every column's checkpoint
            out.update(self.blind.reveal(state))
        return out

    def restart(self, browser: Browser, values: list) -> dict:
        """Put the columns on `values` with every conversation, score and vote afresh (a blind draw)."""
        sync_sides(self.cfg, browser, values)
        browser.session.reset()
        browser.scores, browser.voted = [None] * len(values), set()
        out = self.render(browser)
        for i in range(MAX_SIDES):
            out.update({self.chats[i]: [], self.stats[i]: "", self.scores[i]: ""})
        return out

    def heldout_prompts(self, name) -> list[HeldoutPrompt]:
        """A prompt file's prompts, read again only when the file changed."""
        path = resolve_prompt_file(self.cfg, name)
        mtime = path.stat().st_mtime_ns
        cached = self._prompt_files.get(path.name)
        if cached is None or cached[0] != mtime:
            cached = self._prompt_files[path.name] = (mtime, load_prompts(path))
        return cached[1]

    def ratings_value(self) -> dict:
        """Both rating tables, open votes and blind ones."""
        open_votes, blind_votes = ratings_tables(self.votes.read())
        return {self.ratings: open_votes, self.ratings_blind: blind_votes}

    # --- wiring --------------------------------------------------------------------------------

    def _wire(self) -> None:
        # Inputs as a list (a fixed order for API clients), handed to the handler as {component: value}.
        gen_inputs = [self.state, self.prompt, self.n_sides, *self.pickers, self.temperature, self.top_p,
                      self.max_new, self.seed]

        def named(handler):
            def call(*values):
                yield from handler(dict(zip(gen_inputs, values)))
            return call

        column_outputs = [self.state, *self.chats, *self.stats, *self.scores]
        limit = dict(concurrency_id="generate", concurrency_limit=self.cfg.concurrency)
        self.send.click(named(self.on_send), gen_inputs, [*column_outputs, self.prompt], api_name="send", **limit)
        self.prompt.submit(named(self.on_send), gen_inputs, [*column_outputs, self.prompt], api_visibility="undocumented",
                           **limit)
        self.regen.click(named(self.on_regenerate), gen_inputs, column_outputs, api_name="regenerate", **limit)
        # Stop must not wait behind the generation it stops.
        self.stop.click(self.on_stop, self.state, None, concurrency_limit=None, api_visibility="undocumented")
        self.clear.click(self.on_clear, self.state, [*column_outputs, self.vote_status], api_name="clear")
        for i, chat in enumerate(self.chats):
            chat.clear(functools.partial(self.on_clear_side, i), self.state, [self.state, self.stats[i], self.scores[i]],
                       api_visibility="undocumented")
        for i, picker in enumerate(self.pickers):
            picker.input(functools.partial(self.on_pick, i), [self.state, picker],
                         [self.state, self.chats[i], self.stats[i], self.scores[i]], api_visibility="undocumented")
        self.n_sides.change(self.on_sides, self.n_sides, [*self.columns, self.vote_a, self.vote_b],
                            api_visibility="undocumented")
        self.draw.click(self.on_draw, [self.state, self.prompt_file], [self.state, self.prompt, self.heldout],
                        api_name="heldout_prompt")
        for outcome, button in self.vote_buttons.items():
            button.click(functools.partial(self.on_vote, outcome), [self.state, self.vote_a, self.vote_b],
                         [self.state, self.ratings, self.ratings_blind, self.vote_status, self.blind.status,
                          *self.pickers], api_name=f"vote_{outcome}")
        self.blind.wire(column_outputs)
