"""The web app in a real browser: Playwright drives the machine's Chromium against `python -m app.web`
in a subprocess over a small run. Screenshots go to test-artifacts/ (look at them).

Never skipped: `make test` installs Chromium from Debian when it is missing; a missing browser fails.
"""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def root(web_root, tmp_path_factory) -> Path:
    """A copy of conftest's web_root (demo/, broken/ that cannot load, prompts.jsonl): the tests add a
    checkpoint and a vote to it."""
    return copy_root(web_root, tmp_path_factory.mktemp("browser") / "checkpoints")


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
