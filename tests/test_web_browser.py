"""The web app in a real browser: Playwright drives the machine's Chromium against `python -m app.web`
in a subprocess over a small run: comparing and voting, the Timeline and Training tabs, and a blind
round (checked against what the page holds and what it was sent) with the preference export's
download. Screenshots go to test-artifacts/ (look at them).

Never skipped: `make test` installs Chromium from Debian when it is missing; a missing browser fails.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.support import ROOT, Server, copy_root

ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
# The closed network makes Chromium's background connections fail (and stall) otherwise.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 30_000
# Everything the server sends the page arrives through fetch (the queue's event stream included): keep a
# copy of each body, so a test can check what reached the browser, not only what it shows.
NETWORK_TAP = """
window.__received = [];
const tapped = window.fetch.bind(window);
window.fetch = async (...args) => {
  const response = await tapped(...args);
  try {
    const reader = response.clone().body.getReader();
    const decoder = new TextDecoder();
    (async () => {
      for (;;) {
        const {done, value} = await reader.read();
        if (done) break;
        window.__received.push(decoder.decode(value, {stream: true}));
      }
    })().catch(() => {});
  } catch (e) {}
  return response;
};
"""


@pytest.fixture(scope="module")
def root(web_root, tmp_path_factory) -> Path:
    """A copy of conftest's web_root (demo/, broken/ that cannot load, prompts.jsonl) and a step folder
    demo/step-000050 that links outside it (never listed): the tests add a checkpoint and votes to it."""
    root = copy_root(web_root, tmp_path_factory.mktemp("browser") / "checkpoints")
    shutil.copytree(root / "demo" / "step-000010", root.parent / "outside" / "step-000010")
    (root / "demo" / "step-000050").symlink_to(root.parent / "outside" / "step-000010", target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def server(root, tmp_path_factory):
    srv = Server(root, tmp_path_factory.mktemp("browser-log") / "server.log", "--max_new_tokens", "12")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), "Chromium missing: `make test` installs it (apt-get install chromium)"
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.add_init_script(NETWORK_TAP)
        page.goto(server.url, wait_until="load")
        page.wait_for_selector("#send")
        page.page_errors = errors
        yield page
        browser.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"web-{name}.png"), full_page=True)


def choose(page, elem_id: str, text: str) -> None:
    """Pick the dropdown option containing `text`, as a person would."""
    page.click(f"#{elem_id} input")
    page.locator(f"#{elem_id} li[role=option]", has_text=text).first.click()
    page.wait_for_function(f"document.querySelector('#{elem_id} input').value.includes({text!r})")


def pick(page, column: int, text: str) -> None:
    choose(page, f"pick-{column}", text)


def test_compare_two_checkpoints_vote_and_ratings(page, root, server):
    # The load event fills the pickers: A the first step, B the last.
    page.wait_for_function("document.querySelector('#pick-0 input').value.includes('step 10')")
    # A checkpoint written while the app runs shows up after Refresh.
    shutil.copytree(root / "demo" / "step-000030", root / "demo" / "step-000040")
    page.click("#refresh")
    page.click("#pick-1 input")
    page.locator("#pick-1 li[role=option]", has_text="step 40").wait_for()
    assert page.locator("#pick-1 li[role=option]", has_text="step 50").count() == 0  # the link out of the root
    page.keyboard.press("Escape")
    pick(page, 0, "demo · step 10")
    pick(page, 1, "demo · step 20 · val 2.500 · best")
    page.locator("#n-sides").get_by_text("3").click()  # a third column, on a checkpoint that cannot load
    page.locator("#pick-2 input").wait_for(state="visible")
    pick(page, 2, "broken · step 10")
    shot(page, "1-picked")

    page.click("#draw")
    page.wait_for_function("document.querySelector('#prompt textarea').value.length > 0")
    assert "Constraints" in page.inner_text("#heldout") and "Reference" in page.inner_text("#heldout")
    page.click("#send")
    for i in (0, 1):  # both columns answer, with speed and length
        page.locator(f"#stats-{i}").get_by_text(re.compile(r"tokens/s .* tokens .* (stopped|cut)")).wait_for()
        page.locator(f"#scores-{i}").get_by_text(re.compile("rougeL")).wait_for()
    page.locator("#stats-2").get_by_text("Error").wait_for()  # in its own column; the others answered
    for i in (0, 1):
        assert page.locator(f"#chat-{i} .message-row, #chat-{i} [data-testid=bot]").count() >= 1
    assert "pass" in page.inner_text("#scores-0") or "fail" in page.inner_text("#scores-0")
    shot(page, "2-answered")

    page.click("#vote-b")
    page.locator("#vote-status").get_by_text("Recorded: B better").wait_for()
    page.wait_for_function("document.querySelector('#ratings').innerText.includes('demo/step-000020')")
    ratings = page.inner_text("#ratings")
    assert "demo/step-000010" in ratings
    votes = (root / "votes.jsonl").read_text().splitlines()
    assert len(votes) == 1 and '"outcome": "b"' in votes[0] and "127.0.0.1" not in votes[0]
    shot(page, "3-voted")
    assert server.alive()


def test_timeline_shows_every_step(page):
    page.get_by_role("tab", name="Timeline").click()
    choose(page, "timeline-run", "demo")
    page.wait_for_function("document.querySelectorAll('#timeline-view .sw-step').length >= 3")
    steps = page.locator("#timeline-view .sw-step").evaluate_all("els => els.map(e => e.dataset.step)")
    assert steps[:3] == ["10", "20", "30"]
    assert "answer lower at step 30" in page.inner_text("#timeline-view")
    shot(page, "4-timeline")


def test_training_plot_renders(page):
    page.get_by_role("tab", name="Training").click()
    choose(page, "training-run", "demo")
    page.locator("#training-plot img, #training-plot svg, #training-plot canvas").first.wait_for()
    page.locator("#training-status").get_by_text("overfitting").first.wait_for()
    assert "demo · step 20 · val 2.500 · best" in page.inner_text("#training-checkpoints")
    shot(page, "5-training")
    assert not page.page_errors, page.page_errors


def received(page, start: int = 0) -> str:
    """What the server sent the page since the start-th body chunk."""
    return "".join(page.evaluate(f"window.__received.slice({start})"))


def test_blind_vote_reveal_ratings_and_export(page, root, server):
    """Blind from run demo: nothing the page holds or received says which column is which checkpoint
    until the vote; then the names show, the blind table rates the vote apart from the open one, and
    the export button's file holds both votes."""
    page.get_by_role("tab", name="Compare").click()
    page.locator("#n-sides").get_by_text("2").click()
    page.locator("#pick-2").wait_for(state="hidden")
    choose(page, "blind-from", "demo")
    start = len(page.evaluate("window.__received"))
    page.click("#blind input")
    page.locator("#blind-status").get_by_text("2 checkpoints drawn from run demo").wait_for()
    page.locator("#pick-0").wait_for(state="hidden")
    page.fill("#prompt textarea", "Name three colours.")
    page.click("#send")
    for i in (0, 1):  # both answers complete
        page.locator(f"#stats-{i}").get_by_text(re.compile(r"tokens/s .* (stopped|cut)")).wait_for()
    shot(page, "6-blind")
    # Neither what the page shows nor what it was sent since Blind went on names a column's checkpoint.
    columns = page.evaluate("[0, 1].map(i => ['#pick-', '#chat-', '#stats-', '#scores-'].map("
                            "p => (document.querySelector(p + i) || {}).outerHTML || '').join(''))")
    pickers = page.evaluate("[0, 1, 2, 3].map(i => (document.querySelector('#pick-' + i + ' input') || {}).value)")
    sent = received(page, start)
    assert "tokens/s" in sent and all(not v for v in pickers)
    for shown in (*columns, sent):
        assert "step-0000" not in shown and "step 10" not in shown and "final" not in shown and "demo/" not in shown
    assert str(root.parent / "outside") not in page.content() + received(page)

    page.click("#vote-a")
    page.locator("#vote-status").get_by_text("Recorded blind: A better").wait_for()
    status = page.inner_text("#blind-status")
    names = re.findall(r"[AB] was (demo/step-\d+)", status)
    assert len(names) == 2 and names[0] != names[1], status
    for i, name in enumerate(names):  # the pickers show the checkpoints again, by their labels
        step = int(name.split("-")[-1])
        page.wait_for_function(f"(document.querySelector('#pick-{i} input') || {{}}).value?.includes('step {step}')")
    page.wait_for_function(f"document.querySelector('#ratings-blind').innerText.includes({names[1]!r})")
    blind_table, open_table = page.inner_text("#ratings-blind"), page.inner_text("#ratings")
    assert names[0] in blind_table and "demo/step-000020" in open_table and "demo/step-000010" in open_table
    votes = [json.loads(line) for line in (root / "votes.jsonl").read_text().splitlines()]
    assert [v["blind"] for v in votes] == [False, True] and [votes[1]["a"], votes[1]["b"]] == names
    shot(page, "7-revealed")

    page.click("#export")
    page.locator("#export-status").get_by_text("2 preference pairs, standard (text); none left out.").wait_for()
    with page.expect_download() as download:
        page.locator("#export-file a").first.click()
    rows = [json.loads(line) for line in Path(download.value.path()).read_text(encoding="utf-8").splitlines()]
    assert [(r["chosen_checkpoint"], r["rejected_checkpoint"]) for r in rows] == [
        ("demo/step-000020", "demo/step-000010"), (names[0], names[1])]
    assert rows[1]["prompt"] == "Name three colours." and rows[1]["chosen"] == votes[1]["answers"][0]
    shot(page, "8-exported")
    assert server.alive()
    assert not page.page_errors, page.page_errors
