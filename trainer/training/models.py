"""The model and tokenizer a run starts from: the embedded demo (built here) or a pretrained one
(a Hugging Face folder, a hub id, a Stepwise checkpoint, or a .gguf file converted once to a folder)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from trainer.core.chat import ensure_chat_template, render
from trainer.core.config import ModelConfig
from trainer.core.errors import StepwiseError, first_line
from trainer.inference.gguf import gguf_folder, is_gguf, packaged_file
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
    name = packaged_file(name)
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


def _pretrained_tokenizer(name: str, offline: str | None, needs_config: bool = True):
    """The tokenizer of --pretrained_model; offline: why the hub cannot be reached (hub_access)."""
    from transformers import AutoTokenizer

    tokenizer = from_pretrained(AutoTokenizer.from_pretrained, name, offline=offline, needs_config=needs_config)
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


def lora_base_name(name: str) -> str:
    """What adapter_config.json records as the base: the folder loaded, made absolute so the adapter
    loads from any working directory (for a .gguf file, its converted folder: loadable by any tool;
    if that cache is cleared, Stepwise converts again from the run's config), or the hub id."""
    name = packaged_file(name)
    p = gguf_folder(name, log=_silent) if is_gguf(name) else Path(name).expanduser()  # converted already
    return str(p.resolve()) if p.exists() else name


def apply_lora(model, mcfg: ModelConfig, base: str):
    """The model with LoRA adapters (peft) on --lora_target_modules; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    targets = mcfg.lora_target_modules.strip()
    config = LoraConfig(r=mcfg.lora_r, lora_alpha=mcfg.lora_alpha, lora_dropout=mcfg.lora_dropout, task_type="CAUSAL_LM",
                        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()],
                        )
    try:
        with warnings.catch_warnings():  # peft asks a deprecated transformers property (FutureWarning)
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = get_peft_model(model, config)
    except ValueError as err:  # "Target modules {...} not found in the base model"
        raise StepwiseError(f"--lora_target_modules {mcfg.lora_target_modules}: {first_line(err)}") from None
    # peft records the model's own name_or_path, which may be relative to where training ran.
    peft_model.peft_config["default"].base_model_name_or_path = lora_base_name(base)
    return peft_model


def load_lora_checkpoint(folder: Path, base: str):
    """Tokenizer and trainable LoRA model of a step folder being resumed: the base from
    --pretrained_model, the adapter (exactly as saved) from the folder."""
    from peft import PeftModel

    tokenizer = _pretrained_tokenizer(str(folder), None, needs_config=False)
    _, model = load_pretrained(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return tokenizer, PeftModel.from_pretrained(model, str(folder), is_trainable=True)
