"""--packing: a micro-batch's examples share rows (collate_packed) on literal tensors. Each example sees
only itself: its hidden states in a packed row equal those of the example alone, whatever its
neighbours hold; and a packed step's loss and gradients equal the padded step's to 1e-5 (fp32), with
the fused layers and with the model's own forward."""

import copy
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tests.support import run_trainer
from tests.test_loss import loss_and_grads
from trainer.training.batching import IGNORE, collate, collate_packed, pack_rows, padding_efficiency
from trainer.core.errors import StepwiseError
from trainer.training.fused import fuse_layers
from trainer.training.loss import CausalLMLoss
from trainer.training.setup import check_packing

VOCAB = 500


def model(kind=LlamaForCausalLM, config=LlamaConfig):
    cfg = config(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0)
    torch.manual_seed(0)
    return kind(cfg).eval()


def example(ids: list[int], prompt: int) -> dict:
    return {"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]}


EXAMPLES = [  # literal token ids; the first `prompt` of each are its prompt
    example([5, 17, 9, 33, 2, 41, 8, 60, 7], prompt=4),
    example([11, 3, 98, 4, 4, 12], prompt=2),
    example([70, 71, 72, 3, 9], prompt=3),
    example([13, 14, 100, 200, 300, 1, 2], prompt=5),
]


def test_rows_are_few_and_even():
    assert pack_rows([9, 6, 5, 7], capacity=16) == [[0, 2], [3, 1]]  # 14 and 13, not 16 and 11
    assert pack_rows([9, 6, 5, 7], capacity=40) == [[0, 3, 1, 2]]
    assert pack_rows([9, 6, 5, 7], capacity=9) == [[0], [3], [1], [2]]
    for lengths, cap in (([100] * 8, 512), ([300, 200, 200, 100, 90, 50], 512), ([511, 3, 2], 512)):
        rows = pack_rows(lengths, cap)
        assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in r) <= cap for r in rows)
    assert padding_efficiency([9, 6, 5, 7], [[0, 1, 2, 3]], packed_to=16) == 27 / (2 * 14)
    assert padding_efficiency([9, 6, 5, 7], [[0, 1, 2, 3]]) == 27 / (4 * 9)


def test_collate_packed_on_literal_tensors():
    batch = collate_packed(EXAMPLES, pad_id=0, capacity=16)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no mask: transformers builds the blocks
    assert batch["input_ids"].tolist() == [[5, 17, 9, 33, 2, 41, 8, 60, 7, 70, 71, 72, 3, 9],
                                           [13, 14, 100, 200, 300, 1, 2, 11, 3, 98, 4, 4, 12, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2, 3, 4],
                                              [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 0]]
    x = IGNORE
    assert batch["labels"].tolist() == [[x, x, x, x, 2, 41, 8, 60, 7, x, x, x, 3, 9],
                                        [x, x, x, x, x, 1, 2, x, x, 98, 4, 4, 12, x]]


def hidden(m, batch) -> torch.Tensor:
    with torch.no_grad():
        return m.model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).last_hidden_state


@pytest.mark.parametrize("kind,config", [(LlamaForCausalLM, LlamaConfig), (Qwen2ForCausalLM, Qwen2Config)])
def test_an_example_sees_only_itself(kind, config):
    m = model(kind, config)
    packed = collate_packed(EXAMPLES, pad_id=0, capacity=16)
    rows = pack_rows([len(e["input_ids"]) for e in EXAMPLES], 16)
    got = hidden(m, packed)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(EXAMPLES[i]["input_ids"])
            alone = hidden(m, {"input_ids": torch.tensor([EXAMPLES[i]["input_ids"]])})[0]
            torch.testing.assert_close(got[r, at:at + n], alone, rtol=1e-5, atol=1e-5)
            at += n
    # Another neighbour: example 2's tokens all changed, example 0 (its row-mate) unchanged.
    changed = copy.deepcopy(EXAMPLES)
    changed[2] = example([1, 2, 3, 4, 5], prompt=3)
    again = hidden(m, collate_packed(changed, pad_id=0, capacity=16))
    assert torch.equal(again[0, :9], got[0, :9]) and not torch.allclose(again[0, 9:], got[0, 9:])


def step(m, batch, n, own_forward=False):
    loss = CausalLMLoss(m)
    if own_forward:
        loss.fallback = "the model's own forward"
    return loss_and_grads(loss, m, batch, n)


@pytest.mark.parametrize("fused,own_forward", [(False, False), (True, False), (False, True)])
def test_a_packed_step_gives_the_padded_steps_loss_and_gradients(fused, own_forward):
    m = model().train()
    if fused:
        fuse_layers(m)
    n = torch.tensor(sum(1 for e in EXAMPLES for label in e["labels"][1:] if label != IGNORE))
    padded_loss, padded_grads = step(m, collate(EXAMPLES, pad_id=0), n, own_forward)
    packed_loss, packed_grads = step(m, collate_packed(EXAMPLES, pad_id=0, capacity=16), n, own_forward)
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-5)
    assert padded_grads.keys() == packed_grads.keys() and padded_grads
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_train_with_packing_follows_the_padded_run(tmp_path):
    args = ["--demo_records", "200", "--context_length", "96", "--mini_batch_size", "4", "--max_steps", "3",
            "--eval_freq", "3", "--checkpoint_freq", "3", "--log_freq", "1", "--eval_max_batches", "1",
            "--eval_prompts", "none", "--progress", "false", "--use_tensorboard", "false",
            "--learning_rate", "3e-3", "--output_dir", str(tmp_path)]
    padded = run_trainer(["train", *args, "--run_name", "padded"])
    packed = run_trainer(["train", *args, "--run_name", "packed", "--packing", "true"])
    assert "packed" in packed.stdout and "packed" not in padded.stdout.split("run folder")[0]
    def losses(name):
        history = json.loads((tmp_path / name / "training_metrics.json").read_text())["history"]
        return [h["train_loss"] for h in history if "train_loss" in h]

    a, b = losses("padded"), losses("packed")
    assert len(a) == len(b) == 3
    assert all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(a, b)), (a, b)


def test_a_model_that_ignores_the_boundaries_is_refused(monkeypatch):
    """check_packing (setup, under --packing) passes a model that masks by position_ids, and stops with a
    one-line error when the packed mask is not built (as for a model whose attention ignores it)."""
    import transformers.masking_utils as masking

    m = model().train()
    check_packing(m, EXAMPLES, pad_id=0)
    assert m.training
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(StepwiseError, match="--packing: LlamaForCausalLM does not keep packed examples apart") as err:
        check_packing(m, EXAMPLES, pad_id=0)
    assert "\n" not in str(err.value)
