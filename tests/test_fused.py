"""trainer.training.fused: the fused SwiGLU MLP and RMSNorm against the plain modules, on literal batches:
the same loss and the same gradient of every parameter to 1e-5 (fp32), alone, with gradient checkpointing,
LoRA and torch.compile; fewer saved activations; and modules that are not plain Llama ones left alone."""

import copy
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tests.test_loss import literal_batch, loss_and_grads
from trainer.training.fused import GQA, PLAIN, fuse_layers, share_kv_heads
from trainer.training.loss import CausalLMLoss

VOCAB = 1000


def tiny(kind=LlamaForCausalLM, config=LlamaConfig, **extra):
    cfg = config(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0, **extra)
    torch.manual_seed(0)
    return kind(cfg)


def step(model, batch, n=None, loss_module=None):
    """(loss, gradients) of one step of model through Stepwise's loss (or loss_module over it)."""
    return loss_and_grads(CausalLMLoss(model) if loss_module is None else loss_module, model, batch, n)


def assert_equal_steps(plain, fused, batch, fused_loss=None, n=None):
    loss_p, grads_p = step(plain, batch, n)
    loss_f, grads_f = step(fused, batch, n, fused_loss)
    assert grads_p and grads_p.keys() == grads_f.keys()
    torch.testing.assert_close(loss_f, loss_p, rtol=1e-5, atol=1e-5)
    for name in grads_p:
        torch.testing.assert_close(grads_f[name], grads_p[name], rtol=1e-5, atol=1e-5, msg=name)


def saved_bytes(model):
    """Bytes of the tensors autograd keeps for the backward of one step, parameters aside."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        CausalLMLoss(model)(**literal_batch())
    return sum(storages.values())


@pytest.mark.parametrize("kind,config", [(LlamaForCausalLM, LlamaConfig), (Qwen2ForCausalLM, Qwen2Config)])
def test_fused_layers_give_the_plain_loss_and_gradients(kind, config):
    plain = tiny(kind, config)
    fused = copy.deepcopy(plain)
    assert fuse_layers(fused) == {"mlp": 2, "rmsnorm": 5}  # 2 layers x 2 norms + the final norm
    assert fused.state_dict().keys() == plain.state_dict().keys()
    assert_equal_steps(plain, fused, literal_batch(), n=torch.tensor(10))


def test_with_gradient_checkpointing():
    plain = tiny()
    fused = copy.deepcopy(plain)
    fuse_layers(fused)
    for m in (plain, fused):
        m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        m.train()
    assert_equal_steps(plain, fused, literal_batch())


def test_with_lora_on_the_mlp_and_attention():
    """An MLP whose projections are LoRA layers keeps its own forward; its norms, and the MLPs LoRA
    leaves plain (frozen weights, no weight gradient), are fused and give LoRA's gradients."""
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    plain = get_peft_model(tiny(), copy.deepcopy(lora))
    fused = copy.deepcopy(plain)
    assert fuse_layers(fused) == {"mlp": 2, "rmsnorm": 5}
    assert_equal_steps(plain, fused, literal_batch())
    on_mlp = get_peft_model(tiny(), LoraConfig(r=4, target_modules=["gate_proj", "q_proj"]))
    assert fuse_layers(on_mlp) == {"mlp": 0, "rmsnorm": 5}


def test_under_torch_compile():
    plain = tiny()
    fused = copy.deepcopy(plain)
    fuse_layers(fused)
    compiled = torch.compile(CausalLMLoss(fused), backend="aot_eager")  # as --compile runs the step
    assert_equal_steps(plain, fused, literal_batch(), compiled)


def test_bf16_autocast_stays_close_and_finite():
    plain = tiny()
    fused = copy.deepcopy(plain)
    fuse_layers(fused)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_p, grads_p = step(plain, literal_batch())
        loss_f, grads_f = step(fused, literal_batch())
    assert torch.isfinite(loss_f) and abs(loss_f - loss_p) / loss_p < 1e-2
    for name, g in grads_p.items():
        assert torch.isfinite(grads_f[name]).all() and grads_f[name].dtype == g.dtype
        assert (grads_f[name] - g).norm() <= 0.05 * g.norm() + 1e-6, name


def test_fewer_activations_are_saved_for_the_backward():
    """Per layer, the MLP keeps gate(x) and up(x) (not also silu's output and the product), each norm its
    input and 1/rms (not also the normalised input), and the projections after a norm do not keep its
    output (recomputed in the backward): counted by saved-tensor hooks, parameters aside."""

    plain = tiny()
    fused = copy.deepcopy(plain)
    fuse_layers(fused)
    tokens, floats = 3 * 10, 4
    mlp = 2 * tokens * 160 * floats  # silu's output and the product, per layer
    norms = 5 * tokens * 64 * floats  # the normalised input, per norm
    outputs = 4 * tokens * 64 * floats  # each layer norm's output, saved by the projections after it
    assert saved_bytes(plain) - saved_bytes(fused) == 2 * mlp + norms + outputs


def test_a_loaded_model_keeps_them_through_train_and_eval(tmp_path):
    """from_pretrained (--pretrained_model, --resume) kernelizes a model by default where transformers
    has the `kernels` package, and a kernelized model sets its norms' forwards back on train()/eval():
    a loaded, fused model must save what a built one saves, after mode switches, in a real step."""
    from trainer.inference.loading import load_causal_lm

    built = tiny()
    built.save_pretrained(tmp_path)
    loaded = load_causal_lm(str(tmp_path), torch.float32)
    fuse_layers(built)
    assert fuse_layers(loaded) == {"mlp": 2, "rmsnorm": 5}
    for model in (built, loaded):
        model.eval()
        model.train()
    assert saved_bytes(loaded) == saved_bytes(built)
    loss_b, grads_b = step(built, literal_batch())
    loss_l, grads_l = step(loaded, literal_batch())
    assert torch.equal(loss_l, loss_b) and all(torch.equal(grads_l[k], grads_b[k]) for k in grads_b)


def test_other_modules_are_left_alone(monkeypatch):
    assert fuse_layers(tiny(mlp_bias=True)) == {"mlp": 0, "rmsnorm": 5}  # a biased MLP
    assert fuse_layers(tiny(hidden_act="gelu")) == {"mlp": 0, "rmsnorm": 5}
    model = tiny()
    assert fuse_layers(model) == {"mlp": 2, "rmsnorm": 5}
    assert fuse_layers(model) == {"mlp": 0, "rmsnorm": 0}  # once only
    monkeypatch.setenv(PLAIN, "1")
    assert fuse_layers(tiny()) == {"mlp": 0, "rmsnorm": 0}


def test_shared_kv_heads_give_the_repeated_heads_loss_and_gradients(monkeypatch):
    """SDPA's grouped path under a padding mask (transformers' switch, on by share_kv_heads on the CPU)
    against repeated key/value heads: the same loss and gradients, and the switch set only on the CPU."""
    monkeypatch.delenv(GQA, raising=False)
    model = tiny()
    repeated = step(model, literal_batch())
    assert share_kv_heads(torch.device("cpu")) and os.environ[GQA] == "1"
    shared = step(model, literal_batch())
    head_bytes = 3 * 10 * 16 * 4  # one key or value head: 3 rows x 10 tokens x head_dim 16, fp32
    monkeypatch.setenv(GQA, "0")
    repeated_bytes = saved_bytes(model)
    monkeypatch.setenv(GQA, "1")
    # per layer, keys and values of 2 heads each, not repeated to the 4 query heads
    assert repeated_bytes - saved_bytes(model) == 2 * 2 * 2 * head_bytes
    torch.testing.assert_close(shared[0], repeated[0], rtol=1e-5, atol=1e-5)
    for name in repeated[1]:
        torch.testing.assert_close(shared[1][name], repeated[1][name], rtol=1e-5, atol=1e-5, msg=name)
    monkeypatch.delenv(GQA)
    assert not share_kv_heads(torch.device("meta"))  # any other device: transformers decides
    monkeypatch.setenv(GQA, "0")
    assert not share_kv_heads(torch.device("cpu"))  # a user's own setting is kept
