"""app.session: the comparison session of the web app and the REPL, on real tiny checkpoints."""

from __future__ import annotations

import shutil
import threading

import pytest

from app.session import CompareSession, ModelCache
from tests.support import one_thread
from trainer.core.errors import StepwiseError
from trainer.inference.generate import GenerationSettings, generate_batch


@pytest.fixture(scope="module")
def root(trained_checkpoint, tmp_path_factory):
    """A checkpoint root: run/step-000010 (conftest's trained tiny model), run/step-000020 (a copy) and a
    broken run/step-000030 (config but no weights)."""
    base = tmp_path_factory.mktemp("session")
    run = base / "checkpoints" / "run"
    shutil.copytree(trained_checkpoint, run / "step-000010")
    shutil.copytree(trained_checkpoint, run / "step-000020")
    (run / "step-000030").mkdir()
    shutil.copy(trained_checkpoint / "config.json", run / "step-000030" / "config.json")
    with one_thread():
        yield base / "checkpoints"


SETTINGS = GenerationSettings(max_new_tokens=10)


def test_two_sides_stream_together_and_keep_their_histories(root):
    session = CompareSession(["run/step-000010", "run/step-000020"], settings=SETTINGS, root=root)
    updates = list(session.stream_all("Name a fruit."))
    assert len(updates) >= 3 and all(len(u) == 2 for u in updates)
    final = updates[-1]
    assert all(g is not None and g.done for g in final)
    expected = generate_batch(session.cache.get(root / "run/step-000010").model,
                              session.cache.get(root / "run/step-000010").tokenizer,
                              [[{"role": "user", "content": "Name a fruit."}]], SETTINGS)[0]
    assert [g.text for g in final] == [expected.text, expected.text]
    for side in session.sides:
        assert side.history == [{"role": "user", "content": "Name a fruit."},
                                {"role": "assistant", "content": expected.text}]
        assert side.last.text == expected.text and side.error is None
        assert side.label.startswith("run · step")

    list(session.stream_all("Name a colour."))
    assert [len(s.history) for s in session.sides] == [4, 4]
    assert session.sides[0].history[2] == {"role": "user", "content": "Name a colour."}
    assert session.sides[0].history[3]["content"] == session.sides[0].last.text

    list(session.regenerate())
    assert [len(s.history) for s in session.sides] == [4, 4]
    assert session.sides[0].history[2]["content"] == "Name a colour."

    session.reset()
    assert all(s.history == [] and s.last is None for s in session.sides)


def test_a_broken_side_reports_its_error_while_the_other_answers(root):
    session = CompareSession(["run/step-000010", "run/step-000030"], settings=SETTINGS, root=root)
    updates = list(session.stream_all("Say hello."))
    good, broken = session.sides
    assert updates[-1][0] is not None and updates[-1][0].done
    assert all(u[1] is None for u in updates)
    assert broken.error is not None and "step-000030" in broken.error and "no model weights" in broken.error
    assert broken.history == [] and broken.last is None
    assert good.error is None and len(good.history) == 2


def test_sides_can_be_set_added_dropped_and_left_empty(root):
    session = CompareSession(settings=SETTINGS, root=root)
    assert session.add("run/step-000010") == 0
    assert session.add(None) == 1
    updates = list(session.stream_all("Hi"))
    assert updates[-1][1] is None and session.sides[1].history == []
    session.set_side(1, "run/step-000020")
    assert session.sides[1].history == [] and session.sides[1].path == str(root / "run/step-000020")
    session.set_side(0, str(root / "run/step-000010"))  # the same checkpoint again: the conversation stays
    assert len(session.sides[0].history) == 2
    session.drop(0)
    assert len(session.sides) == 1 and session.sides[0].path.endswith("step-000020")


def test_one_checkpoint_on_two_sides_and_sampled_regeneration(root):
    session = CompareSession(["run/step-000010"] * 2, settings=SETTINGS, root=root)
    final = list(session.stream_all("Say hello."))[-1]
    assert final[0].text == final[1].text  # one model object generating in two threads at once
    assert len(session.cache) == 1
    session.settings = GenerationSettings(max_new_tokens=10, temperature=1.5, seed=3)
    list(session.stream_all("Name a fruit."))
    first = session.sides[0].last.text
    answers = set()
    for _ in range(3):
        list(session.regenerate())
        answers.add(session.sides[0].last.text)
        assert len(session.sides[0].history) == 4
    assert len(answers | {first}) > 1  # each regeneration draws with the next seed
    again = CompareSession(["run/step-000010"], settings=SETTINGS, cache=session.cache, root=root)
    list(again.stream_all("Say hello."))
    again.settings = GenerationSettings(max_new_tokens=10, temperature=1.5, seed=3)
    list(again.stream_all("Name a fruit."))
    assert again.sides[0].last.text == first  # and the whole sequence is reproducible


def test_stop_event_and_early_close(root):
    session = CompareSession(["run/step-000010"], settings=GenerationSettings(max_new_tokens=40), root=root)
    stop = threading.Event()
    stop.set()
    list(session.stream_all("Name an animal.", stop_event=stop))
    assert session.sides[0].last.new_tokens <= 1  # stopped after at most one token, answer kept
    assert len(session.sides[0].history) == 2
    it = session.stream_all("Say hello.")
    next(it)
    it.close()  # a client that went away: threads stop, no half exchange is left
    assert len(session.sides[0].history) == 2


@pytest.mark.parametrize("path", ["../outside", "run/../../outside", "/etc", "/tmp"])
def test_root_confines_paths(root, path):
    session = CompareSession(root=root)
    with pytest.raises(StepwiseError, match="outside the checkpoint root"):
        session.add(path)
    with pytest.raises(StepwiseError, match="outside the checkpoint root"):
        CompareSession([path], root=root)


def test_root_confines_symlinks(root, tmp_path):
    (root / "escape").symlink_to(tmp_path, target_is_directory=True)
    try:
        with pytest.raises(StepwiseError, match="outside the checkpoint root"):
            CompareSession(["escape"], root=root)
    finally:
        (root / "escape").unlink()
    session = CompareSession([str(root / "run" / "step-000010")], root=root)  # absolute inside is fine
    assert session.sides[0].path == str(root / "run" / "step-000010")


def test_model_cache_hits_and_evicts_by_budget(root):
    first = ModelCache().get(root / "run/step-000010")
    size = first.nbytes
    cache = ModelCache(budget_bytes=int(size * 1.5))  # room for one model
    a = cache.get(root / "run/step-000010")
    assert cache.get(str(root / "run/step-000010")) is a  # a hit is the same object
    b = cache.get(root / "run/step-000020")
    assert len(cache) == 1 and (root / "run/step-000020") in cache and (root / "run/step-000010") not in cache
    assert cache.nbytes == size and b is not a
    roomy = ModelCache(budget_bytes=size * 2)
    x, y = roomy.get(root / "run/step-000010"), roomy.get(root / "run/step-000020")
    assert len(roomy) == 2 and x is not y
    roomy.get(root / "run/step-000010")  # now the most recently used
    shutil.copytree(root / "run/step-000020", root / "run/step-000040")
    roomy.get(root / "run/step-000040")
    assert (root / "run/step-000010") in roomy and (root / "run/step-000020") not in roomy


def test_model_cache_loads_once_under_concurrency(root):
    cache = ModelCache()
    got = []
    threads = [threading.Thread(target=lambda: got.append(cache.get(root / "run/step-000010"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4 and all(g is got[0] for g in got)


def test_empty_prompt_and_nothing_to_regenerate(root):
    session = CompareSession(["run/step-000010"], root=root)
    with pytest.raises(StepwiseError, match="empty prompt"):
        session.stream_all("  ")
    with pytest.raises(StepwiseError, match="nothing to regenerate"):
        session.regenerate()
