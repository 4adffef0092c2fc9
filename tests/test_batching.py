"""Masking and batching on literal tensors, and accumulation == one large batch."""

import torch

from trainer.training.batching import (
    IGNORE,
    collate,
    micro_batches,
    padding_efficiency,
    segments,
    tokenize,
)
from trainer.training.models import build_demo_model, build_demo_tokenizer

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Add 2 and 3."},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And 4 and 4?"},
    {"role": "assistant", "content": "8"},
]


def tiny_tokenizer():
    return build_demo_tokenizer(["Be brief. Add 2 and 3. And 4 and 4? 5 8", "### Instruction:\n", "### Response:\n"],
                                vocab_size=300)


def test_only_assistant_turns_are_supervised():
    tok = tiny_tokenizer()
    assert segments(tok, CHAT) == [
        ("Be brief.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n", False),
        ("5</s>", True),
        ("\n\n### Instruction:\nAnd 4 and 4?\n\n### Response:\n", False),
        ("8</s>", True),
    ]
    (example,), stats = tokenize(tok, [{"messages": CHAT}], context_length=512)
    supervised = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE]
    assert tok.decode(supervised) == "5</s>8</s>"
    assert all(label in (IGNORE, t) for t, label in zip(example["input_ids"], example["labels"]))
    assert stats.supervised == 4 and stats.truncated == 0


def test_truncation_and_dropping_are_counted():
    tok = tiny_tokenizer()
    records = [{"messages": CHAT}, {"messages": CHAT[:3]}]
    prompt_len = len(tok(segments(tok, CHAT[:3])[0][0], add_special_tokens=False)["input_ids"])
    examples, stats = tokenize(tok, records, context_length=prompt_len + 1)
    assert stats.truncated == 2
    assert stats.dropped == 0 and len(examples) == 2
    _, stats = tokenize(tok, records, context_length=prompt_len)  # the answer starts past the context
    assert stats.dropped == 2 and stats.examples == 0


def test_collate_pads_right_and_masks_padding():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]},
                     {"input_ids": [8, 9], "labels": [IGNORE, 9]}], pad_id=0)
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [8, 9, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([[IGNORE, 6, 7], [IGNORE, 9, IGNORE]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 1, 0]]))


def test_micro_batches_cover_each_example_once_and_group_lengths():
    lengths = [(i * 37) % 200 + 5 for i in range(1000)]
    batches = micro_batches(lengths, 8, seed=3, epoch=0)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(1000))
    assert batches == micro_batches(lengths, 8, seed=3, epoch=0)
    assert batches != micro_batches(lengths, 8, seed=3, epoch=1)
    shuffled = [list(range(i, i + 8)) for i in range(0, 1000, 8)]
    assert padding_efficiency(lengths, batches) > 0.95 > padding_efficiency(lengths, shuffled)


def test_padding_does_not_change_an_examples_loss():
    """No example attends to another or to padding: its logits are the same alone or batched."""
    tok = tiny_tokenizer()
    model = build_demo_model(tok, 64, seed=0).eval()
    (a, b), _ = tokenize(tok, [{"messages": CHAT}, {"messages": CHAT[1:3]}], 64)
    with torch.no_grad():
        both = model(**{k: v for k, v in collate([a, b], tok.pad_token_id).items() if k != "labels"}).logits
        alone = model(input_ids=torch.tensor([b["input_ids"]])).logits
    n = len(b["input_ids"])
    torch.testing.assert_close(both[1, :n], alone[0], atol=1e-5, rtol=1e-5)


def test_accumulated_micro_batches_give_the_large_batch_gradient(tmp_path):
    """The step's loss is normalised by supervised tokens over the whole accumulated batch."""
    from trainer.cli.options import parse_config
    from trainer.training.loop import accumulate
    from trainer.training.setup import setup

    def grads(mini, total):
        cfg = parse_config(["--demo_records", "60", "--context_length", "64", "--mini_batch_size", str(mini),
                            "--total_batch_size", str(total), "--output_dir", str(tmp_path), "--run_name", f"g{mini}",
                            "--use_tensorboard", "false", "--progress", "false", "--eval_prompts", "none"])
        run = setup(cfg)
        run.reporter.enabled = False
        ids = list(range(8))
        batches = [ids[i:i + mini] for i in range(0, 8, mini)]
        loss, n = accumulate(run, batches)
        return loss / n, [p.grad.clone() for p in run.raw_model.parameters()]

    loss_big, big = grads(8, 8 * 64)
    loss_acc, acc = grads(2, 8 * 64)  # 4 accumulation steps over the same 8 examples
    assert abs(loss_big - loss_acc) < 1e-5
    for g_big, g_acc in zip(big, acc):
        torch.testing.assert_close(g_acc, g_big, atol=1e-5, rtol=1e-4)


def test_an_end_of_turn_token_ends_the_supervised_answer_and_a_plain_text_closing_is_learned_whole():
    """A ChatML-style template closes turns with EOS then a newline: the newline opens the next turn and
    stays prompt. A template whose turns end in plain text (no special token) has that closing learned,
    as it is what the model must produce to stop."""
    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    assert segments(tok, CHAT[1:]) == [
        ("<s>user\nAdd 2 and 3.</s>\n<s>assistant\n", False), ("5</s>", True), ("\n", False),
        ("<s>user\nAnd 4 and 4?</s>\n<s>assistant\n", False), ("8</s>", True), ("\n", False)]
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    assert segments(tok, CHAT[1:3]) == [("user: Add 2 and 3.\n\nassistant: ", False), ("5\n\n", True)]
