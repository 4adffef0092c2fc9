"""`python -m app.web --root checkpoints`: compare the checkpoints of a run in the browser.

Tabs: Compare (2-4 checkpoints side by side, streaming, held-out prompts, open or blind votes, ratings,
the votes' export as a preference dataset), Timeline (one held-out prompt's stored answer at every
step), Training (loss curves, metrics, early stopping, plan), Eval (held-out scoring of chosen
checkpoints). Everything is read from under --root; nothing a browser or API client sends can name a
path outside it, and nothing the page shows names one. Serves on 127.0.0.1 unless --host says
otherwise; a public share link only with --share.
"""

from __future__ import annotations

import argparse
import errno
import socket
import sys
import tempfile
from pathlib import Path

import gradio as gr

from app.catalog import keep_choice
from app.session import CompareSession, ModelCache
from app.votes import PREFERENCES_FILE, VoteStore, export_preferences, left_out_text
from app.web_common import (
    CSS,
    MAX_SIDES,
    WebConfig,
    check_prompt,
    checkpoint_choices,
    client_error,
    default_picks,
    inside_root,
    public,
    run_choices,
    runs,
    settings_from,
    user_error,
)
from app.web_compare import CompareTab
from app.web_eval import build_eval_tab
from app.web_timeline import build_timeline_tab
from app.web_training import build_training_tab
from trainer.cli.args import ArgumentParser, run_command
from trainer.core.errors import StepwiseError, first_line
from trainer.evals.prompts import load_prompts

INTRO = ("**Stepwise**: is step 1500 better than step 1000? Pick a checkpoint per column, send a prompt "
         "(or draw a held-out one), and vote. Root: `{root}`")
EXPORT_LABEL = "Decisive votes as TRL's prompt/chosen/rejected (JSON Lines)"


def export_votes(cfg: WebConfig, folder: Path) -> tuple[str, str]:
    """(the preference dataset file, its status line): app.votes.export_preferences into `folder`, a
    one-line gr.Error (naming neither the root's path nor the folder's) when there is nothing to export."""
    try:
        path, prefs = export_preferences(cfg.root, folder / PREFERENCES_FILE)
    except StepwiseError as err:
        raise user_error(public(folder, public(cfg.root, first_line(err)))) from None
    n = len(prefs.rows)
    form = "conversational" if prefs.conversational else "standard (text)"
    return str(path), f"{n} preference pair{'s' if n != 1 else ''}, {form}; {left_out_text(prefs)}."


def build_app(cfg: WebConfig) -> gr.Blocks:
    """The whole page; one model cache and one votes file shared by every browser."""
    cache = ModelCache(cfg.cache_bytes)
    votes = VoteStore(cfg.root)
    # Exports are written here and handed to gradio, which serves its own copy; removed with the server.
    exports = tempfile.TemporaryDirectory(prefix="stepwise-export-")
    # No usage analytics: a private server on a closed network phones nowhere.
    with gr.Blocks(title="Stepwise: compare checkpoints", analytics_enabled=False) as demo:
        gr.Markdown(INTRO.format(root=cfg.root.name))  # the name only: where the server keeps files is its own
        catalogue = gr.Markdown(elem_id="catalogue")
        with gr.Tabs():
            with gr.Tab("Compare", id="compare"):
                compare = CompareTab(cfg, cache, votes)
                with gr.Row():
                    export = gr.Button("Export preference dataset", scale=0, elem_id="export")
                    export_file = gr.File(label=EXPORT_LABEL, interactive=False, elem_id="export-file", scale=2)
                export_status = gr.Markdown(elem_id="export-status")
            with gr.Tab("Timeline", id="timeline"):
                timeline = build_timeline_tab(cfg)
            with gr.Tab("Training", id="training"):
                training = build_training_tab(cfg)
            with gr.Tab("Eval", id="eval"):
                evaluation = build_eval_tab(cfg, cache)

        run_dropdowns = [timeline.run, training.run]

        def lists(state, picks: list, run_values: list, blind_from, fill: bool) -> dict:
            """Fresh checkpoint and run lists; kept picks stay, empty ones (on load) get defaults, and
            while blind the pickers stay empty (their values would give the hidden draw away)."""
            choices = checkpoint_choices(cfg.root)
            values = {v for _, v in choices}
            hidden = getattr(state, "hidden", False)
            defaults = default_picks(choices, MAX_SIDES) if fill and not hidden else [None] * MAX_SIDES
            out = {p: gr.Dropdown(choices=choices, value=None if hidden else v if v in values else defaults[i])
                   for i, (p, v) in enumerate(zip(compare.pickers, picks))}
            out[evaluation.picks] = gr.Dropdown(choices=choices)
            names = run_choices(cfg.root)
            for dd, v in zip(run_dropdowns, run_values):
                out[dd] = gr.Dropdown(choices=names, value=keep_choice(names, v))
            out[compare.blind.source] = compare.blind.source_choices(names, blind_from)
            out.update(compare.ratings_value())
            out[catalogue] = (f"{len(choices)} checkpoint(s) in {len(names)} run(s)." if choices else
                              "No checkpoints under the root yet: run `make train`, then press Refresh.")
            return out

        list_inputs = [compare.state, *compare.pickers, *run_dropdowns, compare.blind.source]
        list_outputs = [*compare.pickers, evaluation.picks, *run_dropdowns, compare.blind.source, compare.ratings,
                        compare.ratings_blind, catalogue]

        def on_load(state, *values):
            return lists(state, list(values[:MAX_SIDES]), list(values[MAX_SIDES:-1]), values[-1], fill=True)

        def on_refresh(state, *values):
            return lists(state, list(values[:MAX_SIDES]), list(values[MAX_SIDES:-1]), values[-1], fill=False)

        demo.load(on_load, list_inputs, list_outputs, api_visibility="undocumented")
        compare.refresh.click(on_refresh, list_inputs, list_outputs, api_visibility="undocumented")

        def checkpoints() -> list[dict]:
            """Every checkpoint under the root: label (run / step, val loss, best) and value to pass on."""
            return [{"label": label, "value": value} for label, value in checkpoint_choices(cfg.root)]

        def compare_api(prompt: str, checkpoints: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
                        top_p: float = 1.0, seed: int = 0) -> list[dict]:
            """One prompt to several checkpoints (values from /checkpoints), no history: one answer
            each with its stop reason and speed, or the error that checkpoint gave."""
            prompt = check_prompt(cfg, prompt)
            if not isinstance(checkpoints, list) or not 1 <= len(checkpoints) <= MAX_SIDES:
                raise user_error(f"give 1 to {MAX_SIDES} checkpoints")
            try:
                paths = [str(inside_root(cfg.root, c, "checkpoint")) for c in checkpoints]
            except StepwiseError as err:
                raise client_error(cfg.root, err) from None
            session = CompareSession(paths, cache=cache, root=cfg.root,
                                     settings=settings_from(cfg, temperature, top_p, max_new_tokens, seed))
            for _ in session.stream_all(prompt):
                pass
            return [{"checkpoint": c, "text": s.last.text if s.last and not s.error else None,
                     "finished": s.last.finished if s.last and not s.error else None,
                     "new_tokens": s.last.new_tokens if s.last and not s.error else None,
                     "tokens_per_s": round(s.last.tokens_per_s, 2) if s.last and not s.error else None,
                     "error": public(cfg.root, s.error) if s.error else None} for c, s in zip(checkpoints, session.sides)]

        export.click(lambda: export_votes(cfg, Path(exports.name)), None, [export_file, export_status],
                     api_name="export_preferences")

        gr.api(checkpoints, api_name="checkpoints")
        gr.api(compare_api, api_name="compare", concurrency_id="generate", concurrency_limit=cfg.concurrency)
    demo.queue(max_size=256, default_concurrency_limit=4)
    return demo


def port_number(text: str) -> int:
    """--port's type: a TCP port, 1 to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1 to 65535, got {port}")
    return port


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m app.web", description=__doc__.splitlines()[0])
    p.add_argument("--root", default="checkpoints", help="folder of runs (default: checkpoints)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port_number, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--prompts", action="append", default=None, metavar="FILE",
                   help="held-out prompt file for the random-prompt button and the Eval tab (repeatable; "
                        "default: eval_prompts/*.jsonl)")
    p.add_argument("--max_new_tokens", type=int, default=512, help="cap on max new tokens per answer (default 512)")
    p.add_argument("--max_prompt_chars", type=int, default=4000, help="longest prompt accepted (default 4000)")
    p.add_argument("--cache_gb", type=float, default=4.0, help="memory budget of loaded models in GB (default 4)")
    p.add_argument("--concurrency", type=int, default=1,
                   help="generation requests served at once; others wait in the queue (default 1)")
    return p.parse_args(argv)


def check_address(host: str, port: int) -> None:
    """A StepwiseError naming --host or --port unless a server can listen there now, checked before the
    page is built (gradio's own check comes after, as a 14-line OSError)."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        family, kind, proto, _, address = socket.getaddrinfo(bare, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise StepwiseError(f"--host {host}: not an address to serve on ({err.strerror})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a port in TIME_WAIT is free
        try:
            probe.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise StepwiseError(f"--port {port}: already in use on {host} (pick another port)") from None
            if err.errno == errno.EACCES:
                raise StepwiseError(f"--port {port}: not allowed on {host} (ports below 1024 need root)") from None
            if err.errno == errno.EADDRNOTAVAIL:
                raise StepwiseError(f"--host {host}: not an address of this machine") from None
            raise StepwiseError(f"--host {host} --port {port}: cannot listen there ({err.strerror})") from None


def main(argv: list[str] | None = None) -> int:
    return run_command(serve, sys.argv[1:] if argv is None else argv)


def serve(argv: list[str]) -> int:
    """Check every flag, then build the page and serve it until Ctrl-C."""
    args = parse_args(argv)
    root = Path(args.root)
    if not root.is_dir():
        raise StepwiseError(f"--root {args.root}: no such folder (run `make train` first)")
    if args.max_new_tokens < 1 or args.max_prompt_chars < 1 or args.concurrency < 1 or args.cache_gb <= 0:
        raise StepwiseError("--max_new_tokens, --max_prompt_chars, --concurrency and --cache_gb must be positive")
    prompt_files = [Path(f) for f in args.prompts or []]
    for f in prompt_files:
        try:
            load_prompts(f)  # a bad line fails now, not when a browser draws a prompt from it
        except StepwiseError as err:
            raise StepwiseError(f"--prompts {err}") from None
    check_address(args.host, args.port)
    cfg = WebConfig(root=root, prompt_files=prompt_files, max_new_tokens=args.max_new_tokens,
                    max_prompt_chars=args.max_prompt_chars, cache_bytes=int(args.cache_gb * (1 << 30)),
                    concurrency=args.concurrency)
    runs(cfg.root, log=True)  # one line per folder left out of the lists for linking outside the root
    demo = build_app(cfg)
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, css=CSS, show_error=True,
                    run_history=False, footer_links=["api"], enable_monitoring=False, quiet=False)
    except OSError as err:  # taken between the check and the launch
        raise StepwiseError(f"--host {args.host} --port {args.port}: cannot serve there "
                            f"({first_line(err).split('. ')[0]})") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
