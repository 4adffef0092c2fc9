"""The web app (app/web*.py): the path guard, the catalogue, the Timeline/Training/Eval pieces, and the
real server in a subprocess driven through gradio_client (API, path escapes, 20 concurrent requests)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from app.web_common import (
    WebConfig,
    checkpoint_choices,
    default_picks,
    inside_root,
    resolve_checkpoint,
    resolve_run,
    scores_html,
)
from tests.support import ROOT, WEB_PROMPTS, Server, copy_root, free_port, python_env
from trainer.core.errors import StepwiseError


@pytest.fixture(scope="module")
def demo_root(web_root, tmp_path_factory):
    """A copy of conftest's web_root (demo/, broken/, prompts.jsonl) with a checkpoint outside it."""
    root = copy_root(web_root, tmp_path_factory.mktemp("web") / "checkpoints")
    shutil.copytree(root / "demo" / "step-000010", root.parent / "outside" / "step-000010")
    return root


@pytest.fixture(scope="module")
def server(demo_root, tmp_path_factory):
    log = tmp_path_factory.mktemp("web-log") / "server.log"
    srv = Server(demo_root, log, "--max_new_tokens", "8")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server.url, verbose=False)


# --- the guard and the catalogue ---------------------------------------------------------------------

def test_guard_refuses_everything_outside_the_root(demo_root):
    root = demo_root.resolve()
    assert resolve_checkpoint(root, "demo/step-000010") == root / "demo" / "step-000010"
    bad = ["../outside/step-000010", str(root.parent / "outside" / "step-000010"), "/etc/passwd", "~/x",
           "demo/../../outside/step-000010", "", None, 3, ["demo/step-000010"], "demo\x00/step-000010", "."]
    for value in bad:
        with pytest.raises(StepwiseError):
            inside_root(root, value, "checkpoint")
    (root / "link").symlink_to(root.parent / "outside", target_is_directory=True)
    try:
        with pytest.raises(StepwiseError):
            inside_root(root, "link/step-000010", "checkpoint")
    finally:
        (root / "link").unlink()
    with pytest.raises(StepwiseError, match="no checkpoint"):
        resolve_checkpoint(root, "demo/step-000099")
    with pytest.raises(StepwiseError):
        resolve_run(root, "demo/step-000010")
    assert resolve_run(root, "demo") == root / "demo"


def test_catalogue_lists_every_checkpoint_grouped_with_best(demo_root):
    choices = checkpoint_choices(demo_root.resolve())
    values = [v for _, v in choices]
    assert {"demo/step-000010", "demo/step-000020", "demo/step-000030", "demo/final", "broken/step-000010"} == set(values)
    demo = [label for label, v in choices if v.startswith("demo/")]
    assert demo[0].startswith("demo · step 10 · val 3.000") and "· best" in demo[1] and demo[-1].startswith("demo · final")
    runs = [v.split("/")[0] for v in values]
    assert runs == sorted(runs, key=runs.index)  # each run's checkpoints together
    assert default_picks([(v, v) for v in ["r/step-000010", "r/step-000020", "r/step-000030", "r/final"]], 2) == \
        ["r/step-000010", "r/step-000030"]
    assert default_picks([], 2) == [None, None]
    # Fewer step checkpoints than columns: final/ next, then empty columns, never one checkpoint twice.
    assert default_picks([(v, v) for v in ["r/step-000010", "r/step-000020", "r/step-000030", "r/final"]], 4) == \
        ["r/step-000010", "r/step-000030", "r/step-000020", "r/final"]
    assert default_picks([(v, v) for v in ["r/step-000010", "r/final", "q/step-000010"]], 3) == \
        ["r/step-000010", "r/final", None]


def test_timeline_training_and_scores_render(demo_root):
    from app.web_timeline import prompt_choices, timeline_html
    from app.web_training import (
        checkpoint_rows,
        loss_figure,
        plan_text,
        status_markdown,
    )
    from trainer.core.catalog import read_run

    run_dir = demo_root / "demo"
    assert [k for _, k in prompt_choices(run_dir)] == ["lower", "words"]
    page = timeline_html(run_dir, "words")
    assert page.index("answer words at step 10") < page.index("at step 20") < page.index("at step 30")
    assert "length_constraints:number_words" in page and "best" in page
    info = read_run(run_dir)
    rows = checkpoint_rows(info)
    assert [r[0] for r in rows] == ["demo · step 10 · val 3.000", "demo · step 20 · val 2.500 · best",
                                    "demo · step 30 · val 2.700", "demo · final (step 20) · val 2.500"]
    assert "overfitting" in status_markdown(info.metrics) and "patience 3" in status_markdown(info.metrics)
    fig = loss_figure(info.metrics["history"], [10, 20, 30], 20, {10: {"if_prompt_strict": 0.5}})
    assert len(fig.axes[0].lines) >= 6 and len(fig.axes) == 2  # train, val, 3 checkpoints, best star; IF panel
    assert len(loss_figure([], [], None).axes) == 1
    assert "steps per epoch" in plan_text(run_dir, info.metrics)
    html = scores_html({"instruction_id_list": ["a", "b"], "strict": [True, False], "loose": [True, True],
                        "rougeL": 0.25, "length": 4})
    assert "a</code>: pass" in html and "b</code>: loose pass" in html and "rougeL 0.250" in html


def test_web_config_defaults_to_repo_prompt_files(tmp_path):
    cfg = WebConfig(root=tmp_path)
    assert cfg.root == tmp_path.resolve()
    assert all(p.suffix == ".jsonl" for p in cfg.prompt_files)


@pytest.mark.parametrize("case, expect", [
    ("port_in_use", "error: --port {port}: already in use on 127.0.0.1"),
    ("no_root", "error: --root {tmp}/nope: no such folder"),
    ("bad_prompts", "error: --prompts {tmp}/bad.jsonl:2: invalid JSON"),
    ("unknown_instruction", "error: --prompts {tmp}/bad.jsonl:1: unknown instruction id 'no:such'"),
    ("missing_prompts", "error: --prompts {tmp}/none.jsonl: prompt file not found"),
    ("port_out_of_range", "error: python -m app.web: argument --port: a port is 1 to 65535, got 70000"),
])
def test_cli_mistakes_are_one_line_exit_2_and_write_nothing(tmp_path, case, expect):
    """`python -m app.web` as a user starts it: each mistake is one line naming the flag, before the page
    is built or anything is written (the port in use too: gradio's own report is a 14-line OSError)."""
    root = tmp_path / "checkpoints"
    root.mkdir()
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(WEB_PROMPTS[0]) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(WEB_PROMPTS[0]) + "\n{not json\n" if case == "bad_prompts" else
                   json.dumps({"prompt": "hi", "instruction_id_list": ["no:such"], "kwargs": [{}]}) + "\n")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    args = {"port_in_use": ["--root", str(root), "--prompts", str(good)],
            "no_root": ["--root", str(tmp_path / "nope"), "--port", str(free_port())],
            "bad_prompts": ["--root", str(root), "--prompts", str(good), "--prompts", str(bad)],
            "unknown_instruction": ["--root", str(root), "--prompts", str(bad)],
            "missing_prompts": ["--root", str(root), "--prompts", str(tmp_path / "none.jsonl")],
            "port_out_of_range": ["--root", str(root), "--port", "70000"]}[case]
    if case == "port_in_use":
        args += ["--port", str(port)]
    before = sorted(tmp_path.rglob("*"))
    try:
        proc = subprocess.run([sys.executable, "-m", "app.web", *args], cwd=ROOT,
                              env=python_env(GRADIO_ANALYTICS_ENABLED="False"), capture_output=True, text=True,
                              timeout=120)
    finally:
        busy.close()
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expect.format(port=port, tmp=tmp_path)), proc.stderr
    assert "Running on" not in proc.stdout
    assert sorted(tmp_path.rglob("*")) == before


# --- the real server ---------------------------------------------------------------------------------

def test_api_lists_and_compares_checkpoints(client):
    listed = {c["value"]: c["label"] for c in client.predict(api_name="/checkpoints")}
    assert "demo/step-000020" in listed and "· best" in listed["demo/step-000020"]
    out = client.predict(prompt="Name three colours.", checkpoints=["demo/step-000010", "demo/step-000030"],
                         max_new_tokens=500, api_name="/compare")
    assert [o["checkpoint"] for o in out] == ["demo/step-000010", "demo/step-000030"]
    for o in out:
        assert o["error"] is None and isinstance(o["text"], str)
        assert 1 <= o["new_tokens"] <= 8  # the server's cap, not the 500 asked for


def test_broken_checkpoint_errors_in_its_column_only(client, server):
    out = client.predict(prompt="hi", checkpoints=["broken/step-000010", "demo/step-000010"], api_name="/compare")
    assert out[0]["error"] and out[0]["text"] is None
    assert out[1]["error"] is None and out[1]["text"] is not None
    assert server.alive()


@pytest.mark.parametrize("value", ["../outside/step-000010", "demo/../../outside/step-000010", "ABSOLUTE",
                                   "/etc", "~/step-000010"])
def test_api_never_loads_outside_the_root(client, demo_root, value):
    from gradio_client.exceptions import AppError

    if value == "ABSOLUTE":
        value = str(demo_root.parent / "outside" / "step-000010")
    with pytest.raises(AppError, match="not a checkpoint under the root"):
        client.predict(prompt="hi", checkpoints=[value, "demo/step-000010"], api_name="/compare")
    # The stateful endpoint of the page: a bad pick leaves its column empty with the reason.
    result = client.predict("hi", 2, value, "demo/step-000010", None, None, 0.0, 1.0, 4, 0, api_name="/send")
    shown = json.dumps(result)
    assert "not a checkpoint under the root" in shown


@pytest.mark.parametrize("value", ["..", "../outside", "ABSOLUTE", "demo/../.."])
def test_run_pickers_never_read_outside_the_root(client, demo_root, value):
    if value == "ABSOLUTE":
        value = str(demo_root.parent / "outside")
    _, html = client.predict(value, api_name="/timeline_run")
    assert "not a run under the root" in html
    assert "not a run under the root" in client.predict(value, "lower", api_name="/timeline")
    plot, status, table, plan = client.predict(value, api_name="/training")
    assert "not a run under the root" in status and not table["data"] and plot is None
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="not a checkpoint under the root"):
        client.predict([value + "/step-000010"], "prompts.jsonl", 1, 1, api_name="/eval")
    with pytest.raises(AppError, match="not in the list of choices"):  # prompt files are named, never paths
        client.predict(["demo/step-000010"], "../prompts.jsonl", 1, 1, api_name="/eval")


def test_prompt_length_is_capped(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="at most 4000"):
        client.predict(prompt="x" * 4001, checkpoints=["demo/step-000010"], api_name="/compare")


def test_twenty_concurrent_requests_all_answered(server):
    from gradio_client import Client

    def ask(i: int):
        c = Client(server.url, verbose=False)
        return c.predict(prompt=f"request {i}", checkpoints=["demo/step-000010", "demo/step-000020"],
                         max_new_tokens=4, api_name="/compare")

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(ask, range(20)))
    assert len(results) == 20
    assert all(len(r) == 2 and all(o["error"] is None and o["text"] is not None for o in r) for r in results)
    assert server.alive()


def test_eval_endpoint_scores_checkpoints(client):
    summary, answers = client.predict(["demo/step-000010", "demo/step-000030"], "prompts.jsonl", 2, 4,
                                      api_name="/eval")
    assert [r[0] for r in summary["data"]] == ["demo/step-000010", "demo/step-000030"]
    assert answers["headers"][:2] == ["key", "prompt"] and len(answers["data"]) == 2


def test_eval_tab_scores_are_the_heldout_path(demo_root):
    """The Eval tab's row is heldout_samples' summary of the same prompts, and its progress only grows."""
    from app.session import ModelCache
    from app.web_eval import SUMMARY_KEYS, run_eval
    from trainer.evals.heldout import heldout_samples
    from trainer.evals.prompts import load_prompts
    from trainer.inference.generate import GenerationSettings
    from trainer.inference.loading import load_model

    cfg = WebConfig(root=demo_root, prompt_files=[demo_root / "prompts.jsonl"])
    seen = []
    summary, answers = run_eval(cfg, ModelCache(), ["demo/step-000010"], "prompts.jsonl", 2, 4,
                                lambda done, desc: seen.append(done))
    loaded = load_model(demo_root / "demo" / "step-000010", device="cpu")
    rows, s = heldout_samples(loaded.model, loaded.tokenizer, load_prompts(demo_root / "prompts.jsonl"),
                              GenerationSettings(max_new_tokens=4))
    (row,) = summary.values.tolist()
    assert row[:2] == ["demo/step-000010", 2]
    assert row[2:-1] == [None if s[k] is None else round(s[k], 4) for k in SUMMARY_KEYS]
    assert row[-1] == f"{sum(r['finished'] for r in rows)}/2"
    assert answers.iloc[:, 2].tolist() == [f"{r['response']}\n[{'✓' if r['strict'][0] else '✗'}"
                                           f" rougeL {r['rougeL']:.2f}]" for r in rows]
    assert seen == sorted(seen) and seen[-1] == (2, 2)


# --- the Compare tab's handlers, in process ------------------------------------------------------------

def test_compare_handlers_turns_regenerate_stop_votes_clear(demo_root, tmp_path):
    import threading

    import gradio as gr

    from app.session import ModelCache
    from app.votes import VoteStore
    from app.web_compare import CompareTab

    cfg = WebConfig(root=demo_root, prompt_files=[demo_root / "prompts.jsonl"], max_new_tokens=300)
    with gr.Blocks():
        tab = CompareTab(cfg, ModelCache(1 << 30), VoteStore(tmp_path))
    data = {tab.state: None, tab.prompt: "hello", tab.n_sides: 2, tab.pickers[0]: "demo/step-000010",
            tab.pickers[1]: "demo/step-000030", tab.pickers[2]: None, tab.pickers[3]: None, tab.temperature: 0.0,
            tab.top_p: 1.0, tab.max_new: 4, tab.seed: 0}

    def send(changes=None):
        updates = list(tab.on_send({**data, **(changes or {})}))
        assert len(updates) >= 2 and updates[-1][tab.prompt] == ""
        data[tab.state] = updates[-1][tab.state]
        return updates[-1]

    last = send()
    browser = data[tab.state]
    assert [len(s.history) for s in browser.session.sides] == [2, 2]
    assert "tokens/s" in last[tab.stats[0]] and "tokens/s" in last[tab.stats[1]]
    send({tab.prompt: "and again"})  # multi-turn: each column keeps its own history
    assert [len(s.history) for s in browser.session.sides] == [4, 4]
    before = [s.history[-1]["content"] for s in browser.session.sides]
    list(tab.on_regenerate(data))
    assert [s.history[-1]["content"] for s in browser.session.sides] == before  # greedy: the same answers

    tab.on_vote("b", browser, "A", "B")
    with pytest.raises(gr.Error, match="Already voted"):
        tab.on_vote("a", browser, "B", "A")
    assert [v.outcome for v in VoteStore(tmp_path).read()] == ["b"]

    # Stop ends both columns' answers early; the partial answers stay in the history.
    updates = tab.on_send({**data, tab.prompt: "a long one", tab.max_new: 300})
    next(updates)
    threading.Timer(0.05, tab.on_stop, args=(browser,)).start()
    list(updates)
    assert all(s.last.new_tokens < 300 for s in browser.session.sides)
    assert [len(s.history) for s in browser.session.sides] == [6, 6]

    # A held-out prompt is scored under each answer.
    drawn = tab.on_draw(browser, "prompts.jsonl")
    last = send({tab.prompt: drawn[tab.prompt]})
    assert all(sc is not None for sc in browser.scores) and "rougeL" in last[tab.scores[0]]

    # Switching a column's checkpoint restarts that column only; the same checkpoint twice cannot be voted on.
    tab.on_pick(1, browser, "demo/step-000010")
    assert browser.session.sides[1].history == [] and len(browser.session.sides[0].history) == 8
    send({tab.pickers[1]: "demo/step-000010"})
    with pytest.raises(gr.Error, match="same checkpoint"):
        tab.on_vote("tie", browser, "A", "B")
    cleared = tab.on_clear(browser)
    assert all(s.history == [] for s in browser.session.sides) and cleared[tab.chats[0]] == []
    with pytest.raises(gr.Error, match="prompt"):
        list(tab.on_send({**data, tab.prompt: "   "}))


# --- the real trainer's run (conftest's tiny_run): the layout contract, read the way the tabs read it -----

def test_real_trainer_run_lists_and_renders(tiny_run):
    from app.web_timeline import prompt_choices, timeline_html
    from app.web_training import (
        checkpoint_rows,
        loss_figure,
        plan_text,
        status_markdown,
    )
    from trainer.core.catalog import read_run

    root = tiny_run.parent.resolve()
    choices = checkpoint_choices(root)
    values = [v for _, v in choices]
    assert values == ["tiny/step-000010", "tiny/step-000020", "tiny/step-000030", "tiny/final"]
    assert sum("· best" in label for label, _ in choices) == 1
    assert default_picks(choices, 2) == ["tiny/step-000010", "tiny/step-000030"]
    keys = [k for _, k in prompt_choices(tiny_run)]
    assert keys, "the trainer stored no held-out samples"
    page = timeline_html(tiny_run, keys[0])
    assert page.count("data-step=") == 3 and "tokens" in page
    info = read_run(tiny_run)
    rows = checkpoint_rows(info)
    assert [r[1] for r in rows[:3]] == [10, 20, 30] and all(isinstance(r[3], float) for r in rows)
    assert "Verdict" in status_markdown(info.metrics)
    assert "steps per epoch" in plan_text(tiny_run, info.metrics)
    assert len(loss_figure(info.metrics["history"], [10, 20, 30], info.metrics["best"]["step"]).axes) == 1
