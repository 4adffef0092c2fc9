"""The model and tokenizer a run starts from: the embedded demo (built here) or a pretrained one
(a Hugging Face folder, a hub id, a Stepwise checkpoint, or a .gguf file converted once to a folder)."""

from __future__ import annotations

import os

import torch

from trainer.core.chat import ensure_chat_template, render
from trainer.core.errors import StepwiseError
from trainer.inference.gguf import gguf_folder, is_gguf
from trainer.inference.hub import hub_access
from trainer.inference.loading import from_pretrained, load_causal_lm

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}

# The tiny Llama of the embedded default: about 3.5M parameters, small enough to learn the demo
# tasks on two CPU cores in minutes.
DEMO_MODEL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=10000.0)
DEMO_VOCAB = 2048


def build_demo_tokenizer(texts: list[str], vocab_size: int = DEMO_VOCAB):
    """A byte-level BPE trained on the demo data, wrapped as a transformers tokenizer with the
    Alpaca-style chat template (so it is saved with every checkpoint)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=SPECIAL["unk_token"]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, **SPECIAL)
    ensure_chat_template(tokenizer)
    return tokenizer


def build_demo_model(tokenizer, context_length: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=context_length,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **DEMO_MODEL)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def demo_texts(records: list[dict]) -> list[str]:
    """Raw text to train the demo tokenizer on: every turn plus the template's headings."""
    texts = [m["content"] for r in records for m in r["messages"]]
    return texts + ["### Instruction:\n", "### Response:\n"]


def resolve_pretrained(name: str) -> str:
    """The folder to load for --pretrained_model: a .gguf file's converted folder (converted now when
    not cached, said in the log by rank 0), any other name unchanged."""
    if not is_gguf(name):
        return name
    main = os.environ.get("RANK", "0") == "0"  # every rank converts or reuses; one says so
    return str(gguf_folder(name, "--pretrained_model", log=_print if main else _silent))


def _print(text: str) -> None:
    print(text, flush=True)


def _silent(text: str) -> None:
    pass


def load_pretrained_tokenizer(name: str):
    name = resolve_pretrained(name)
    return _pretrained_tokenizer(name, hub_access(name))


def _pretrained_tokenizer(name: str, offline: str | None):
    """The tokenizer of --pretrained_model; offline: why the hub cannot be reached (hub_access)."""
    from transformers import AutoTokenizer

    tokenizer = from_pretrained(AutoTokenizer.from_pretrained, name, offline=offline)
    ensure_chat_template(tokenizer)
    return tokenizer


def load_pretrained(name: str):
    """Tokenizer and model from a Hugging Face folder, a hub id or a Stepwise checkpoint: safetensors
    weights only (a pickled-only folder is refused), or a .gguf file (resolve_pretrained)."""
    name = resolve_pretrained(name)
    offline = hub_access(name)
    tokenizer = _pretrained_tokenizer(name, offline)
    return tokenizer, load_causal_lm(name, torch.float32, "--pretrained_model", offline)


def check_template(tokenizer) -> None:
    """Fail early, with the flag named, when the template cannot render a plain exchange."""
    try:
        render(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    except Exception as err:  # jinja errors come in many types
        raise StepwiseError(f"--pretrained_model: the tokenizer's chat template fails ({err})") from None
