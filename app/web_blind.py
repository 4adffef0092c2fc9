"""Blind comparison on the Compare tab: the columns' checkpoints drawn at random, from a run or from the
columns' own picks, and shown only as A/B/C/D until a vote is cast (recorded with blind=True) or Blind
is turned off, since a person who sees "step 3000" judges its answer differently.

Which column holds which checkpoint lives in the tab's gr.State, which stays on the server: while
blind, the pickers are emptied (not only hidden), a column's error is not shown (it would name the
checkpoint), and a picker changed by a client is ignored, so nothing the browser receives tells the
columns apart.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from app.web_common import (
    MAX_SIDES,
    MIN_SIDES,
    SIDE_NAMES,
    client_error,
    public,
    rel,
    resolve_checkpoint,
    resolve_run,
    run_info,
    user_error,
)
from trainer.core.catalog import RunInfo
from trainer.core.errors import StepwiseError

PICKED = "/picked"
"""The source meaning the checkpoints picked in the columns (a run's name has no slash)."""
PICKED_LABEL = "the columns' picks"


@dataclass
class BlindRound:
    """A blind comparison: which checkpoints the columns hold, known to the server only."""

    pool: list[str]
    """The checkpoints drawn from (values relative to the root), for Draw again."""
    drawn: list[str]
    """Per column, its checkpoint."""
    source: str
    """A run's name, or PICKED."""
    revealed: bool = False
    """A vote was cast: the names are shown, and later votes on this round are open ones."""


def blind_pool(root: Path, source, picks: list) -> list[str]:
    """The checkpoints (values relative to root) a round draws its columns from: the columns' picks,
    which must be that many different checkpoints, or a run's checkpoints (final/ only when its step
    folder is gone, so a round never puts one set of weights against itself)."""
    if source == PICKED:
        values = [rel(root, resolve_checkpoint(root, p)) for p in picks if p]
        if len(values) != len(picks) or len(set(values)) != len(values):
            raise StepwiseError(f"pick {len(picks)} different checkpoints in the columns first (or draw from a run)")
        return values
    info: RunInfo = run_info(resolve_run(root, source), root)
    steps = {c.step for c in info.checkpoints if not c.is_final}
    return [rel(root, c.path) for c in info.checkpoints if not c.is_final or c.step not in steps]


def draw(pool: list[str], n: int, rng: random.Random) -> list[str]:
    """n different checkpoints of pool in random order, one per column."""
    if len(pool) < n:
        raise StepwiseError(f"{len(pool)} checkpoint(s) to draw from, fewer than the {n} columns: "
                            "choose fewer columns or another run")
    return rng.sample(pool, n)


def names(values: list[str]) -> str:
    """`A was run/step-000010, B was ...`: the reveal."""
    return ", ".join(f"{SIDE_NAMES[i]} was `{v}`" for i, v in enumerate(values)) + "."


class BlindMode:
    """The Blind switch, where to draw from, Draw again and a status line, over a CompareTab `tab`
    (its pickers, columns, n_sides, browser(), restart() and vote_status)."""

    def __init__(self, tab):
        """The controls, in the caller's layout row; `add_status` places the status line."""
        self.tab = tab
        self.switch = gr.Checkbox(False, label="Blind: hide the checkpoints until you vote", elem_id="blind",
                                  scale=1)
        # Custom values as in the other run pickers: the runs are listed at page load, and
        # resolve_run decides what a value may name.
        self.source = gr.Dropdown([(PICKED_LABEL, PICKED)], value=PICKED, label="Draw them from",
                                  allow_custom_value=True, elem_id="blind-from", scale=1)
        self.again = gr.Button("Draw again", visible=False, scale=0, elem_id="blind-draw")
        self.status = None

    def add_status(self) -> None:
        self.status = gr.Markdown(elem_id="blind-status")

    def source_choices(self, runs: list[str], current) -> gr.Dropdown:
        """The source dropdown with the runs under the root now (the page's load and Refresh)."""
        choices = [(PICKED_LABEL, PICKED), *((r, r) for r in runs)]
        return gr.Dropdown(choices=choices, value=current if current in {v for _, v in choices} else PICKED)

    def shown_picks(self, values: list) -> dict:
        """Every picker visible again, on `values`."""
        return {p: gr.Dropdown(value=values[i] if i < len(values) else None, visible=True, allow_custom_value=True)
                for i, p in enumerate(self.tab.pickers)}

    def reveal(self, browser) -> dict:
        """After a blind vote: every column's checkpoint shown, in its picker and the status line."""
        browser.blind.revealed = True
        return {**self.shown_picks(browser.blind.drawn), self.status: "**Revealed:** " + names(browser.blind.drawn)}

    def on_input(self, data: dict, again: bool) -> dict:
        """The switch turned on (or Draw again): draw the columns' checkpoints, start every conversation
        afresh and empty the pickers. Turned off: show the checkpoints again."""
        tab = self.tab
        browser = tab.browser(data[tab.state])
        if browser.busy.locked():
            raise user_error("Still answering: press Stop first.")
        if not data[self.switch]:
            hidden = browser.hidden
            shown = browser.blind.drawn if hidden else [data[p] for p in tab.pickers]
            browser.blind = None
            return {tab.state: browser, **self.shown_picks(shown), tab.n_sides: gr.Radio(interactive=True),
                    self.again: gr.Button(visible=False), self.status: f"**Blind off:** {names(shown)}" if hidden else ""}
        n = max(MIN_SIDES, min(int(data[tab.n_sides] or MIN_SIDES), MAX_SIDES))
        source = data[self.source]
        root = tab.cfg.root
        try:
            if again and browser.blind is not None and source == browser.blind.source:
                pool = browser.blind.pool  # the pickers are empty while blind: the same checkpoints again
            else:
                pool = blind_pool(root, source, [data[p] for p in tab.pickers[:n]])
            drawn = draw(pool, n, random.Random())  # unseeded: no client can predict the draw
        except StepwiseError as err:
            if browser.blind is None:  # the switch goes back off; .input does not fire for that
                return {tab.state: browser, self.switch: False, self.status: f"**Blind:** {public(root, err)}"}
            raise client_error(root, err) from None
        browser.blind = BlindRound(pool, drawn, source)
        what = PICKED_LABEL if source == PICKED else f"run `{source}`"
        return {**tab.restart(browser, drawn), tab.vote_status: "",
                **{p: gr.Dropdown(value=None, visible=False) for p in tab.pickers},
                tab.n_sides: gr.Radio(interactive=False), self.again: gr.Button(visible=True),
                self.status: f"**Blind:** {n} checkpoints drawn from {what}, shown only as "
                             f"{', '.join(SIDE_NAMES[:n])}. Send a prompt and vote: the names show after your vote."}

    def wire(self, column_outputs: list) -> None:
        tab = self.tab
        inputs = [tab.state, self.switch, self.source, tab.n_sides, *tab.pickers]
        outputs = [*column_outputs, *tab.pickers, self.switch, tab.n_sides, self.again, self.status, tab.vote_status]

        def handler(again: bool):
            return lambda *values: self.on_input(dict(zip(inputs, values)), again)

        # .input, not .change: the switch turned back off after a failed draw must not fire again.
        self.switch.input(handler(False), inputs, outputs, api_name="blind")
        self.again.click(handler(True), inputs, outputs, api_name="blind_draw")
