"""The web app (app/web*.py): the path guard, the catalogue, the Timeline/Training/Eval pieces, blind
mode, and the real server in a subprocess driven through gradio_client (API, path escapes, symlinks out
of the root, blind votes and the preference export, 20 concurrent requests)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from app.web_common import (
    WebConfig,
    checkpoint_choices,
    default_picks,
    inside_root,
    public,
    resolve_checkpoint,
    resolve_run,
    scores_html,
)
from tests.support import ROOT, WEB_PROMPTS, Server, copy_root, free_port, python_env
from trainer.core.errors import StepwiseError


@pytest.fixture(scope="module")
def demo_root(web_root, tmp_path_factory):
    """A copy of conftest's web_root (demo/, broken/, prompts.jsonl) with a checkpoint outside it, and
    two links to it inside: a step folder demo/step-000040 and a run escape/. Every test below sees the
    rest of the root work around them."""
    root = copy_root(web_root, tmp_path_factory.mktemp("web") / "checkpoints")
    shutil.copytree(root / "demo" / "step-000010", root.parent / "outside" / "step-000010")
    (root / "demo" / "step-000040").symlink_to(root.parent / "outside" / "step-000010", target_is_directory=True)
    (root / "escape").symlink_to(root.parent / "outside", target_is_directory=True)
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
    from app.web_common import run_info
    from app.web_timeline import prompt_choices, timeline_html
    from app.web_training import (
        checkpoint_rows,
        loss_figure,
        plan_text,
        status_markdown,
    )

    run_dir = demo_root / "demo"
    assert [k for _, k in prompt_choices(run_dir)] == ["lower", "words"]
    page = timeline_html(run_dir, "words")
    assert page.index("answer words at step 10") < page.index("at step 20") < page.index("at step 30")
    assert "length_constraints:number_words" in page and "best" in page
    assert page.index("Reference answer") < page.index("red green blue") < page.index("answer words at step 10")
    info = run_info(run_dir)  # as the tab reads it: the link demo/step-000040 left out
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
    assert "answer wrong" in scores_html({"correct": False, "length": 2}) and "answer" not in html
    from app.web_training import CHECKPOINT_HEADERS

    assert "task_accuracy" in CHECKPOINT_HEADERS  # the Training tab's per-checkpoint table


def test_links_outside_the_root_are_left_out_and_never_shown(demo_root, capsys):
    """A step folder or a run that is a symlink to outside the root: left out of every list (the rest
    lists), refused when a client names it, quoted as sent and never by where it leads, one log line."""
    from app.web_common import run_info, runs
    from app.web_timeline import timeline_html
    from app.web_training import checkpoint_rows

    root = demo_root.resolve()
    values = [v for _, v in checkpoint_choices(root)]
    assert "demo/step-000030" in values and "demo/step-000040" not in values
    assert not any(v.startswith("escape/") or "outside" in v for v in values)
    capsys.readouterr()
    assert [r.name for r in runs(root, log=True)] and sorted(capsys.readouterr().err.splitlines()) == [
        "stepwise web: skipped demo/step-000040: it links outside the root",
        "stepwise web: skipped run escape: it links outside the root"]
    runs(root)  # a page load or Refresh lists again without repeating the log
    assert capsys.readouterr().err == ""
    for value, what in (("demo/step-000040", "checkpoint"), ("escape/step-000010", "checkpoint"), ("escape", "run")):
        with pytest.raises(StepwiseError) as err:
            (resolve_run if what == "run" else resolve_checkpoint)(root, value)
        assert str(err.value) == f"{value!r}: not a {what} under the root (use a name from the list)"
        assert capsys.readouterr().err == f"stepwise web: refused {what} {value!r} from a client: not under the root\n"
    info = run_info(root / "demo")
    assert [c.step for c in info.checkpoints] == [10, 20, 30, 20]  # the steps, then final/
    assert "step 40" not in timeline_html(root / "demo", "words")
    assert not any("step 40" in row[0] for row in checkpoint_rows(info))
    # What a client is shown never carries the server's root path.
    assert public(root, f"{root}/broken/step-000010/model.safetensors: damaged") == \
        "broken/step-000010/model.safetensors: damaged"
    assert public(root, f"--root {root}: no such folder") == "--root the root: no such folder"


def test_timeline_shows_old_samples_without_a_reference_and_skips_torn_lines(web_root, tmp_path):
    from app.web_timeline import prompt_choices, timeline_html

    root = copy_root(web_root, tmp_path / "checkpoints")
    for step in (10, 20, 30):  # samples written before rows carried the reference
        samples = root / "demo" / f"step-{step:06d}" / "samples.jsonl"
        rows = [json.loads(line) for line in samples.read_text().splitlines()]
        assert all(r.pop("reference") for r in rows)
        samples.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"key": "torn", "resp\n')
    assert [k for _, k in prompt_choices(root / "demo")] == ["lower", "words"]
    page = timeline_html(root / "demo", "words")
    assert page.count("data-step=") == 3 and "answer words at step 30" in page and "Reference answer" not in page


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


def test_links_outside_the_root_through_the_server(server, client, demo_root):
    """The page loads with every other checkpoint in its pickers; naming a link is refused in one log
    line and no traceback; no answer, page or config names the link's target or the root's path."""
    from gradio_client.exceptions import AppError

    from app.web_blind import PICKED

    root = demo_root.resolve()
    secrets = (str(root.parent / "outside"), str(root))
    log = Path(server.log.name)
    assert log.read_text().count("stepwise web: skipped demo/step-000040: it links outside the root") == 1
    start = len(log.read_text())
    load = next(d["id"] for d in client.config["dependencies"] if ["load"] == [t[1] for t in d.get("targets", [])])
    loaded = json.dumps(client.predict(None, None, None, None, None, None, PICKED, fn_index=load))
    assert "demo/step-000010" in loaded and "demo/step-000030" in loaded and "broken/step-000010" in loaded
    assert "step-000040" not in loaded and "escape" not in loaded
    page = urllib.request.urlopen(server.url).read().decode() + urllib.request.urlopen(server.url + "config").read().decode()
    with pytest.raises(AppError) as err:
        client.predict(prompt="hi", checkpoints=["demo/step-000040"], api_name="/compare")
    assert "'demo/step-000040': not a checkpoint under the root" in str(err.value)
    sent = json.dumps(client.predict("hi", 2, "demo/step-000040", "demo/step-000010", None, None, 0.0, 1.0, 4, 0,
                                     api_name="/send"))
    assert "'demo/step-000040': not a checkpoint under the root" in sent
    broken = client.predict(prompt="hi", checkpoints=["broken/step-000010"], api_name="/compare")[0]["error"]
    assert broken and "broken/step-000010" in broken
    _, timeline = client.predict("escape", api_name="/timeline_run")
    assert "not a run under the root" in timeline
    for shown in (loaded, page, str(err.value), sent, broken, timeline):
        assert not any(secret in shown for secret in secrets)
    new = log.read_text()[start:]
    assert "Traceback" not in new
    assert [line for line in new.splitlines() if "refused" in line] == [
        "stepwise web: refused checkpoint 'demo/step-000040' from a client: not under the root"] * 2 + [
        "stepwise web: refused run 'escape' from a client: not under the root"]


def test_blind_votes_and_the_preference_export_through_the_server(server, demo_root):
    """Two open votes (the second on a second turn), then a blind round drawn from the run: nothing the
    browser gets names a column's checkpoint until the vote, which is recorded blind and rated apart;
    the export button's file holds the three decisive votes, the two-turn one as a conversation."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from app.votes import VoteStore

    root = demo_root.resolve()
    client = Client(server.url, verbose=False)  # a session of its own: the blind round lives in its state
    with pytest.raises(AppError, match="votes.jsonl: no votes file") as err:
        client.predict(api_name="/export_preferences")
    assert str(root) not in str(err.value)
    picks, settings = ["demo/step-000010", "demo/step-000030", None, None], [0.0, 1.0, 4, 0]
    client.predict("Name a colour.", 2, *picks, *settings, api_name="/send")
    client.predict("A", "B", api_name="/vote_b")
    client.predict("And another?", 2, *picks, *settings, api_name="/send")
    client.predict("A", "B", api_name="/vote_a")

    hidden = json.dumps(client.predict(True, "demo", 2, *picks, api_name="/blind"))
    assert "2 checkpoints drawn from run `demo`, shown only as A, B" in hidden
    # The pickers sent while blind are ignored: the hidden draw answers.
    hidden += json.dumps(client.predict("Name a colour.", 2, *picks, *settings, api_name="/send"))
    assert "tokens/s" in hidden
    assert "step-0000" not in hidden and "· step" not in hidden and "demo/" not in hidden
    revealed = client.predict("A", "B", api_name="/vote_a")
    votes = VoteStore(root).read()
    assert [v.blind for v in votes] == [False, False, True]
    blind = votes[-1]
    assert {blind.a, blind.b} < {"demo/step-000010", "demo/step-000020", "demo/step-000030"} and blind.a != blind.b
    open_table, blind_table, status, reveal, *pickers = revealed
    assert status == f"Recorded blind: A better (A = {blind.a}, B = {blind.b})."
    assert reveal == f"**Revealed:** A was `{blind.a}`, B was `{blind.b}`."
    assert [p["value"] for p in pickers[:2]] == [blind.a, blind.b] and all(p["visible"] for p in pickers)
    assert {r[0]: r[2] for r in open_table["data"]} == {"demo/step-000010": 2, "demo/step-000030": 2}
    assert {r[0]: r[2] for r in blind_table["data"]} == {blind.a: 1, blind.b: 1}
    assert [len(h) for h in votes[1].histories] == [3, 3]  # the second turn's vote holds both conversations

    path, status = client.predict(api_name="/export_preferences")
    assert status == "3 preference pairs, conversational; none left out."
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]
    assert [(r["chosen_checkpoint"], r["rejected_checkpoint"]) for r in rows] == [
        ("demo/step-000030", "demo/step-000010"), ("demo/step-000010", "demo/step-000030"), (blind.a, blind.b)]
    assert all(r["prompt"][0] == {"role": "user", "content": "Name a colour."} for r in rows)
    assert [m["role"] for m in rows[1]["prompt"] + rows[1]["chosen"]][-2:] == ["user", "assistant"]
    assert rows[1]["chosen"][-1]["content"] == votes[1].answers[0]
    assert not (root / "preferences.jsonl").exists()  # the download is written outside the root


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
    (vote,) = VoteStore(tmp_path).read()
    assert vote.outcome == "b" and not vote.blind
    # Each column's conversation before its answer, so a multi-turn vote exports as a conversation.
    assert [[m["content"] for m in h] for h in vote.histories] == [
        ["hello", s.history[1]["content"], "and again"] for s in browser.session.sides]

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


def test_blind_mode_handlers_hide_draw_again_and_reveal(demo_root, tmp_path):
    import gradio as gr

    from app.session import ModelCache
    from app.votes import VoteStore
    from app.web_blind import PICKED
    from app.web_compare import CompareTab

    cfg = WebConfig(root=demo_root, prompt_files=[demo_root / "prompts.jsonl"], max_new_tokens=300)
    with gr.Blocks():
        tab = CompareTab(cfg, ModelCache(1 << 30), VoteStore(tmp_path))
    b = tab.blind
    data = {tab.state: None, tab.prompt: "hello", tab.n_sides: 2, tab.pickers[0]: "demo/step-000010",
            tab.pickers[1]: "demo/step-000030", tab.pickers[2]: None, tab.pickers[3]: None, tab.temperature: 0.0,
            tab.top_p: 1.0, tab.max_new: 4, tab.seed: 0}

    def blind(on: bool, source, again: bool = False) -> dict:
        out = b.on_input({**data, b.switch: on, b.source: source}, again)
        data[tab.state] = out[tab.state]
        return out

    def send() -> dict:
        *_, last = tab.on_send(data)
        return last

    # A draw that cannot be made turns the switch back off and says why.
    data[tab.n_sides] = 4
    out = blind(True, "demo")  # steps 10, 20, 30 (final/ is step 20 again)
    assert out[b.switch] is False and "3 checkpoint(s) to draw from, fewer than the 4 columns" in out[b.status]
    data.update({tab.n_sides: 2, tab.pickers[1]: "demo/step-000010"})
    out = blind(True, PICKED)
    assert out[b.switch] is False and "pick 2 different checkpoints" in out[b.status]
    data[tab.pickers[1]] = "demo/step-000030"

    # The columns' own picks, shuffled: the pickers are emptied and hidden, the column count fixed.
    out = blind(True, PICKED)
    browser = data[tab.state]
    drawn = browser.blind.drawn
    assert sorted(drawn) == ["demo/step-000010", "demo/step-000030"] and browser.hidden
    assert all(out[p].value is None and out[p].visible is False for p in tab.pickers)
    assert out[tab.n_sides].interactive is False and out[b.again].visible is True
    # While blind, a picker a client changes is ignored, and Send answers with the drawn checkpoints.
    assert tab.on_pick(0, browser, "demo/step-000020") == {tab.state: browser}
    data.update({tab.pickers[0]: "demo/final", tab.pickers[1]: "demo/final"})
    send()
    assert [rel_path(s.path) for s in browser.session.sides] == drawn
    revealed = tab.on_vote("b", browser, "A", "B")
    (vote,) = VoteStore(tmp_path).read()
    assert vote.blind and [vote.a, vote.b] == drawn and not browser.hidden
    assert [revealed[p].value for p in tab.pickers[:2]] == drawn and revealed[b.status].startswith("**Revealed:**")
    data.update({p: revealed[p].value for p in tab.pickers})  # as the browser now shows them
    send()  # the names are known now: the next vote is an open one
    tab.on_vote("a", browser, "A", "B")
    assert [v.blind for v in VoteStore(tmp_path).read()] == [True, False]

    # Draw again from the same (now hidden) picks: a fresh round, conversations cleared.
    out = blind(True, PICKED, again=True)
    assert browser.hidden and all(s.history == [] for s in browser.session.sides) and out[tab.chats[0]] == []
    # A column that cannot load says so without naming its checkpoint while blind.
    data.update({tab.pickers[0]: "broken/step-000010", tab.pickers[1]: "demo/step-000010"})
    blind(False, PICKED)
    blind(True, PICKED)
    last = send()
    shown = [last[tab.stats[i]] for i in range(2)]
    assert sum("hidden checkpoint could not answer" in t for t in shown) == 1 and not any("broken" in t for t in shown)
    # Turning Blind off shows the checkpoints again, in the pickers and the status line.
    drawn = browser.blind.drawn
    out = blind(False, PICKED)
    assert browser.blind is None and [out[p].value for p in tab.pickers[:2]] == drawn
    assert out[b.status] == f"**Blind off:** A was `{drawn[0]}`, B was `{drawn[1]}`."
    assert out[tab.n_sides].interactive is True and out[b.again].visible is False
    shown = tab.render(browser)
    assert any("broken/step-000010" in shown[tab.stats[i]] for i in range(2))  # the error, now it may be seen


def rel_path(path: str) -> str:
    return Path(path).relative_to(Path(path).parents[1]).as_posix()


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
    assert "Reference answer" in page  # the trainer's samples.jsonl stores each prompt's reference
    info = read_run(tiny_run)
    rows = checkpoint_rows(info)
    assert [r[1] for r in rows[:3]] == [10, 20, 30] and all(isinstance(r[3], float) for r in rows)
    assert "Verdict" in status_markdown(info.metrics)
    assert "steps per epoch" in plan_text(tiny_run, info.metrics)
    assert len(loss_figure(info.metrics["history"], [10, 20, 30], info.metrics["best"]["step"]).axes) == 1
