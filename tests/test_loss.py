"""The chunked loss on supervised positions (trainer.training.loss) against Hugging Face's own loss,
on literal batches: the same value and the same gradient of every parameter to 1e-5 (fp32), for any
chunk size, with tied embeddings, LoRA and torch.compile; and no tensor of full logits ever exists."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from trainer.cli.options import parse_config
from trainer.training.loop import step_batches, train_step, validate
from trainer.training.loss import FORCE_HF, CausalLMLoss
from trainer.training.setup import setup

VOCAB = 1000
IGNORE = -100


def tiny_llama(tied: bool, layers: int = 2) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied, pad_token_id=0)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def literal_batch() -> dict:
    """Three rows of 10: right padding, -100 prompt labels, and row 2 with no supervised token
    after the shift (its one label is at position 0, which nothing predicts)."""
    torch.manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, 10))
    mask = torch.tensor([[1] * 10, [1] * 7 + [0] * 3, [1] * 5 + [0] * 5])
    ids[mask == 0] = 0
    labels = torch.full_like(ids, IGNORE)
    labels[0, 4:] = ids[0, 4:]
    labels[1, 3:7] = ids[1, 3:7]
    labels[2, 0] = ids[2, 0]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


SUPERVISED = 6 + 4  # row 0: labels 4..9, row 1: labels 3..6, row 2: none after the shift


def loss_and_grads(fn, model, batch, n) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = fn(**batch, num_items_in_batch=n)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def hf(model):
    return lambda **kw: model(**kw).loss


def assert_same(ours, theirs, tol=1e-5):
    (loss, grads), (ref_loss, ref_grads) = ours, theirs
    assert abs(loss.item() - ref_loss.item()) <= tol, (loss.item(), ref_loss.item())
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        diff = (g - ref_grads[name]).abs().max().item()
        assert diff <= tol, f"{name}: gradient differs by {diff}"


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", [3, SUPERVISED, SUPERVISED + 7])
def test_loss_and_every_gradient_equal_hugging_faces(tied, chunk):
    model, batch = tiny_llama(tied), literal_batch()
    assert int((batch["labels"][:, 1:] != IGNORE).sum()) == SUPERVISED
    n = torch.tensor(SUPERVISED + 5)  # as in accumulation: the count spans other micro-batches too
    wrapper = CausalLMLoss(model, chunk_size=chunk)
    assert wrapper.fallback is None
    reference = loss_and_grads(hf(model), model, batch, n)
    assert reference[1], "the reference has gradients"
    assert_same(loss_and_grads(wrapper, model, batch, n), reference)


def test_with_gradient_checkpointing_too():
    model, batch = tiny_llama(True), literal_batch()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    n = torch.tensor(SUPERVISED)
    assert_same(loss_and_grads(CausalLMLoss(model, chunk_size=4), model, batch, n),
                loss_and_grads(hf(model), model, batch, n))


def test_without_num_items_it_is_the_mean_as_in_hugging_face():
    model, batch = tiny_llama(True), literal_batch()
    assert_same(loss_and_grads(CausalLMLoss(model, chunk_size=4), model, batch, None),
                loss_and_grads(hf(model), model, batch, None))


def test_a_micro_batch_without_any_supervised_token_gives_zero_loss_and_zero_gradients():
    model, batch = tiny_llama(True), literal_batch()
    batch = {k: v[2:] for k, v in batch.items()}  # row 2 alone: nothing supervised
    ours = loss_and_grads(CausalLMLoss(model), model, batch, torch.tensor(7))
    assert ours[0].item() == 0.0
    assert all(not g.any() for g in ours[1].values())
    assert_same(ours, loss_and_grads(hf(model), model, batch, torch.tensor(7)))


class LogitRows(TorchDispatchMode):
    """The most rows of any tensor an op creates whose last dimension is the vocabulary."""

    def __init__(self):
        super().__init__()
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:  # a transposed view of the weight is not a new tensor
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == VOCAB:
                    self.rows = max(self.rows, t.numel() // VOCAB)
        return out


@pytest.mark.parametrize("tied", [False, True])
def test_no_tensor_of_full_logits_exists_in_forward_or_backward(tied):
    model, batch = tiny_llama(tied), literal_batch()
    n = torch.tensor(SUPERVISED)
    for fn, most_forward, most_backward in ((hf(model), 30, 30), (CausalLMLoss(model, chunk_size=4), 4, 0)):
        with LogitRows() as forward:
            loss = fn(**batch, num_items_in_batch=n)
        with LogitRows() as backward:
            loss.backward()
        # Hugging Face's 30 rows (3 x 10, prompt and padding included) show that the mode sees both passes.
        assert (forward.rows, backward.rows) == (most_forward, most_backward)


def test_a_lora_model_gets_equal_loss_and_lora_gradients():
    from peft import LoraConfig, get_peft_model

    # init_lora_weights=False: B is random rather than zero, so A's gradients are not all zero.
    lora = get_peft_model(tiny_llama(True), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                       target_modules="all-linear", init_lora_weights=False))
    batch, n = literal_batch(), torch.tensor(SUPERVISED)
    reference = loss_and_grads(lambda **kw: lora(**kw).loss, lora, batch, n)
    assert reference[1] and all("lora_" in name for name in reference[1])
    for given in (lora.get_base_model(), lora):  # peft injects in place: either one is the same model
        wrapper = CausalLMLoss(given, chunk_size=3)
        assert wrapper.fallback is None
        assert_same(loss_and_grads(wrapper, lora, batch, n), reference)


def test_compiled_equals_hugging_face():
    model, batch = tiny_llama(True, layers=1), literal_batch()  # dynamo's time grows with the layers
    n = torch.tensor(SUPERVISED)
    # aot_eager: dynamo's tracing and AOT autograd as with inductor, without minutes of C++ compilation.
    compiled = torch.compile(CausalLMLoss(model, chunk_size=4), backend="aot_eager")
    assert_same(loss_and_grads(compiled, model, batch, n), loss_and_grads(hf(model), model, batch, n))


def test_bf16_autocast_computes_the_cross_entropy_in_fp32():
    model, batch = tiny_llama(True), literal_batch()
    n = torch.tensor(SUPERVISED)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = loss_and_grads(CausalLMLoss(model, chunk_size=4), model, batch, n)
        theirs = loss_and_grads(hf(model), model, batch, n)
    assert ours[0].dtype == torch.float32
    # Both project in bf16 and take the softmax in fp32; the rest is bf16 rounding.
    assert abs(ours[0].item() - theirs[0].item()) < 1e-2 * theirs[0].item()
    head = "model.embed_tokens.weight"
    assert torch.nn.functional.cosine_similarity(ours[1][head].flatten(), theirs[1][head].flatten(), dim=0) > 0.999


def test_an_lm_head_with_a_bias_phi():
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    model = PhiForCausalLM(PhiConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0))
    assert model.lm_head.bias is not None
    batch, n = literal_batch(), torch.tensor(SUPERVISED)
    wrapper = CausalLMLoss(model, chunk_size=4)
    assert wrapper.fallback is None
    ours, theirs = loss_and_grads(wrapper, model, batch, n), loss_and_grads(hf(model), model, batch, n)
    assert theirs[1]["lm_head.bias"].abs().max() > 0
    assert_same(ours, theirs)


def test_models_that_change_their_logits_keep_their_own_forward():
    from transformers import (
        CohereConfig,
        CohereForCausalLM,
        Gemma2Config,
        Gemma2ForCausalLM,
    )

    small = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    batch, n = literal_batch(), torch.tensor(SUPERVISED)
    for model, reason in ((Gemma2ForCausalLM(Gemma2Config(final_logit_softcapping=30.0, **small)), "softcapping"),
                          (CohereForCausalLM(CohereConfig(logit_scale=0.5, **small)), "forward is not the plain")):
        wrapper = CausalLMLoss(model)
        assert reason in wrapper.fallback
        assert_same(loss_and_grads(wrapper, model, batch, n), loss_and_grads(hf(model), model, batch, n), tol=0)


def test_training_steps_have_the_same_losses_as_with_hugging_faces_loss(tmp_path, monkeypatch, capsys):
    cfg = parse_config(["--demo_records", "200", "--context_length", "64", "--mini_batch_size", "4",
                        "--total_batch_size", str(2 * 4 * 64), "--max_steps", "4", "--eval_max_batches", "2",
                        "--learning_rate", "3e-3", "--progress", "false", "--use_tensorboard", "false",
                        "--eval_prompts", "none", "--output_dir", str(tmp_path)])
    steps = {}
    for name, force in (("ours", "0"), ("hf", "1")):
        monkeypatch.setenv(FORCE_HF, force)
        run, cache = setup(cfg), {}
        steps[name] = [(*train_step(run, step_batches(run, s, cache)), validate(run)) for s in range(4)]
        steps[name + " log"] = capsys.readouterr().out
    assert "loss: the model's own forward" in steps["hf log"] and "loss:" not in steps["ours log"]
    for ours, theirs in zip(steps["ours"], steps["hf"]):  # (loss, grad norm, tokens, val loss) per step
        assert ours[2] == theirs[2]
        for a, b in zip(ours[:2] + ours[3:], theirs[:2] + theirs[3:]):
            assert abs(a - b) < 1e-5, (ours, theirs)
