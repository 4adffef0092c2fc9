"""trainer.inference.generate on a real tiny Llama (conftest's trained_checkpoint: its answers vary by prompt)."""

from __future__ import annotations

import threading

import pytest
import torch

from tests.support import one_thread
from trainer.core.errors import StepwiseError
from trainer.inference.generate import (
    Generation,
    GenerationSettings,
    _answer,
    generate_batch,
    prompt_ids,
    stream,
)
from trainer.inference.loading import load_model
from trainer.training.checkpoint import save_hf


@pytest.fixture(scope="module")
def tiny(trained_checkpoint):
    with one_thread():
        yield load_model(trained_checkpoint, device="cpu")


CONVERSATIONS = [[{"role": "user", "content": q}] for q in [
    "Name a fruit.", "Say hello.", "Reverse: x y z w v", "What is 7 plus 1?", "Capital of France?",
    "Name an animal that lives on a farm and says something.", "Sort: c a b", "Hi",
    "Name a colour, please, and then name another colour.",
]] + [[{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "An apple."},
       {"role": "user", "content": "Name a colour."}]]


def test_batched_greedy_equals_one_at_a_time(tiny):
    settings = GenerationSettings(max_new_tokens=12)
    batched = generate_batch(tiny.model, tiny.tokenizer, CONVERSATIONS, settings, batch_size=4)
    single = [generate_batch(tiny.model, tiny.tokenizer, [c], settings)[0] for c in CONVERSATIONS]
    assert [g.text for g in batched] == [g.text for g in single]
    assert [g.new_tokens for g in batched] == [g.new_tokens for g in single]
    # Not trivially equal: the trained model answers different prompts differently, in input order.
    assert len({g.text for g in batched}) >= 3
    assert all(0 < g.new_tokens <= 12 for g in batched)
    assert "Blue." in batched[9].text  # it learned something: the second turn of a conversation
    assert any(g.finished for g in batched)  # and to end its answer with EOS
    # And the same as calling model.generate directly on the unpadded prompt.
    ids = torch.tensor([prompt_ids(tiny.tokenizer, CONVERSATIONS[4])])
    raw = tiny.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                              pad_token_id=tiny.tokenizer.pad_token_id)
    assert tiny.tokenizer.decode(raw[0, ids.shape[1]:], skip_special_tokens=True).startswith(batched[4].text)


def test_on_batch_reports_progress(tiny):
    seen = []
    generate_batch(tiny.model, tiny.tokenizer, CONVERSATIONS, GenerationSettings(max_new_tokens=4), batch_size=4,
                   on_batch=seen.append)
    assert seen == [4, 8, 10]


def test_stream_final_text_equals_generate_batch(tiny):
    settings = GenerationSettings(max_new_tokens=16)
    for conversation in (CONVERSATIONS[1], CONVERSATIONS[5]):
        snapshots = list(stream(tiny.model, tiny.tokenizer, conversation, settings))
        expected = generate_batch(tiny.model, tiny.tokenizer, [conversation], settings)[0]
        assert snapshots[-1].done and not any(s.done for s in snapshots[:-1])
        assert snapshots[-1].text == expected.text
        assert snapshots[-1].finished == expected.finished
        assert snapshots[-1].new_tokens == expected.new_tokens
        texts = [s.text for s in snapshots]
        assert all(texts[-1].startswith(t) for t in texts)  # snapshots only grow
    assert len(snapshots) >= 3


def test_stream_stops_on_event(tiny):
    stop = threading.Event()
    stop.set()
    snapshots = list(stream(tiny.model, tiny.tokenizer, CONVERSATIONS[5],
                            GenerationSettings(max_new_tokens=40), stop_event=stop))
    assert snapshots[-1].done and snapshots[-1].new_tokens <= 1 and not snapshots[-1].finished


def test_abandoned_stream_stops_its_thread(tiny):
    before = threading.active_count()
    it = stream(tiny.model, tiny.tokenizer, CONVERSATIONS[5], GenerationSettings(max_new_tokens=60, temperature=1.0))
    next(it)
    it.close()
    assert threading.active_count() == before


def test_seeded_sampling_is_reproducible(tiny):
    hot = GenerationSettings(max_new_tokens=12, temperature=1.5, top_p=0.95, top_k=40, seed=7)
    first = generate_batch(tiny.model, tiny.tokenizer, CONVERSATIONS, hot, batch_size=4)
    again = generate_batch(tiny.model, tiny.tokenizer, CONVERSATIONS, hot, batch_size=3)
    assert [g.text for g in first] == [g.text for g in again]
    streamed = list(stream(tiny.model, tiny.tokenizer, CONVERSATIONS[0], hot))[-1]
    assert streamed.text == first[0].text
    other = generate_batch(tiny.model, tiny.tokenizer, CONVERSATIONS, GenerationSettings(
        max_new_tokens=12, temperature=1.5, top_p=0.95, top_k=40, seed=8), batch_size=4)
    greedy = generate_batch(tiny.model, tiny.tokenizer, CONVERSATIONS, GenerationSettings(max_new_tokens=12))
    assert [g.text for g in other] != [g.text for g in first]
    assert [g.text for g in greedy] != [g.text for g in first]


def test_long_prompt_is_cut_to_the_model_positions(tiny):
    long = [{"role": "user", "content": "Name a fruit. " * 80}]
    assert len(prompt_ids(tiny.tokenizer, long)) > tiny.model.config.max_position_embeddings
    out = generate_batch(tiny.model, tiny.tokenizer, [long, CONVERSATIONS[0]], GenerationSettings(max_new_tokens=50))
    assert 0 < out[0].new_tokens <= tiny.model.config.max_position_embeddings // 2


def test_answer_cuts_at_the_first_stop_token(tiny):
    tok = tiny.tokenizer
    ids = tok("Blue.", add_special_tokens=False)["input_ids"]
    pad = tok.pad_token_id
    assert _answer(tok, ids + [tok.eos_token_id, pad, pad], {tok.eos_token_id}, pad) == ("Blue.", True, len(ids) + 1)
    assert _answer(tok, ids + [pad, pad], {tok.eos_token_id}, pad) == ("Blue.", False, len(ids))
    assert Generation("x", True, 10, 2.0).tokens_per_s == 5.0


def test_settings_reject_bad_values():
    with pytest.raises(StepwiseError, match="--temperature"):
        GenerationSettings(temperature=-1)
    with pytest.raises(StepwiseError, match="--top_p"):
        GenerationSettings(top_p=0)


def test_load_model_reads_a_run_checkpoint(tiny, tmp_path):
    step = tmp_path / "run" / "step-000010"
    save_hf(tiny.model, tiny.tokenizer, step)
    loaded = load_model(step, device="cpu")
    assert loaded.info is not None and loaded.info.step == 10 and loaded.info.run == "run"
    assert loaded.label.startswith("run · step 10")
    assert not loaded.model.training and not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.nbytes == sum(p.numel() * 4 for p in loaded.model.parameters()) + sum(
        b.numel() * b.element_size() for b in loaded.model.buffers())
    assert loaded.tokenizer.chat_template == tiny.tokenizer.chat_template


@pytest.mark.parametrize("keep, message", [
    ((), "no config.json"),
    (("config.json",), "no model weights"),
    (("config.json", "model.safetensors"), "no tokenizer"),
])
def test_load_model_errors_name_the_folder(tiny, tmp_path, keep, message):
    full = tmp_path / "full"
    save_hf(tiny.model, tiny.tokenizer, full)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in keep:
        (broken / name).write_bytes((full / name).read_bytes())
    with pytest.raises(StepwiseError) as err:
        load_model(broken)
    assert str(broken) in str(err.value) and message in str(err.value) and "\n" not in str(err.value)


def test_load_model_missing_path_fails_at_once(tmp_path, monkeypatch):
    with pytest.raises(StepwiseError, match="no such checkpoint folder"):
        load_model(tmp_path / "nope")
    # "run/step-000001" has a hub id's shape, but "run" is a local folder: a typo, not a download.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    with pytest.raises(StepwiseError, match="run/step-000001: no such checkpoint folder"):
        load_model("run/step-000001")
