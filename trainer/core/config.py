"""Run configuration: one dataclass per concern, defaults < YAML (`--config`) < CLI flags.

Every field is also a flag of the same name (`--learning_rate 3e-4`). A YAML file may be flat or
grouped under any section names (`training:`, `data:` ...); keys are looked up by name, and
Hugging Face TrainingArguments spellings (`num_train_epochs`, `eval_steps`, `save_steps`, ...) are
accepted as aliases, so a YAML block written for HF Trainer loads as written. The resolved config is
saved with every run. The flags themselves are built by trainer.cli.options.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from trainer.core.catalog import list_runs
from trainer.core.errors import StepwiseError
from trainer.core.resources import data_path, user_or_packaged

# Metrics a best model can be chosen by, and whether higher is better. The IF metrics, rougeL and
# task_accuracy come from held-out generations at each checkpoint (`eval_prompts`).
METRICS = {
    "val_loss": False,
    "if_prompt_strict": True,
    "if_prompt_loose": True,
    "if_inst_strict": True,
    "if_inst_loose": True,
    "rougeL": True,
    "task_accuracy": True,
}


def arg(default, help: str):
    """A config field with its one-line doc (the flag's --help, via HfArgumentParser)."""
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    pretrained_model: str = arg("demo", "`demo` (build the embedded tokenizer and tiny Llama), a Hugging Face folder, a hub id, a Stepwise checkpoint, or a .gguf file (converted once).")
    dtype: str = arg("auto", "`auto` (bf16 autocast on CUDA, fp32 on CPU), `bf16` or `fp32`.")
    compile: bool = arg(False, "Wrap the model in torch.compile.")
    lora_r: int = arg(0, "LoRA rank through peft; 0 (the default) fine-tunes every weight.")
    lora_alpha: int = arg(16, "LoRA scaling numerator (the update is scaled by lora_alpha / lora_r).")
    lora_dropout: float = arg(0.05, "Dropout on the LoRA input.")
    lora_target_modules: str = arg("all-linear", "Comma-separated module names to adapt, or `all-linear` (every linear projection of the blocks, not the LM head).")
    gradient_checkpointing: bool = arg(False, "Recompute each block's activations in the backward pass: less memory, about a third more compute.")
    fsdp: bool = arg(False, "Under torchrun, shard parameters, gradients and optimizer state with FSDP2 (fully_shard) instead of replicating them with DDP.")

    def __post_init__(self):
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise StepwiseError(f"--dtype must be auto, bf16 or fp32, got {self.dtype!r}")
        if self.lora_r < 0:
            raise StepwiseError(f"--lora_r must be >= 0 (0 = full fine-tune), got {self.lora_r}")
        if self.lora_r and self.lora_alpha <= 0:
            raise StepwiseError(f"--lora_alpha must be positive, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise StepwiseError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_r and not [m for m in self.lora_target_modules.split(",") if m.strip()]:
            raise StepwiseError("--lora_target_modules may not be empty (`all-linear`, or names such as q_proj,v_proj)")
        if self.lora_r and self.fsdp:
            raise StepwiseError("--fsdp with --lora_r is not supported: a LoRA run's trainable weights are small; use DDP (drop --fsdp)")


@dataclass
class DataConfig:
    dataset: str = arg("demo", "`demo` (the generated dataset), a .json/.jsonl/.parquet/.csv file, or a hub dataset id.")
    val_dataset: str | None = arg(None, "An explicit validation file or hub id; otherwise `val_fraction` of `dataset` is held out.")
    val_fraction: float = arg(0.05, "Share of the dataset held out for validation (seeded, deterministic).")
    context_length: int = arg(256, "Tokens per example; longer examples are truncated (prompt-only ones dropped).")
    packing: bool = arg(False, "Pack each mini batch's examples into shared rows of up to context_length tokens, each attending only to itself (less padding; on a CPU the dense block-diagonal mask costs more than it saves).")
    strict: bool = arg(False, "Reject the first malformed record with file:line instead of skipping it.")
    demo_records: int = arg(30000, "Records generated for the `demo` dataset.")

    def __post_init__(self):
        if not 0.0 <= self.val_fraction < 1.0:
            raise StepwiseError(f"--val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.context_length < 8:
            raise StepwiseError(f"--context_length must be at least 8, got {self.context_length}")
        if self.demo_records < 10:
            raise StepwiseError(f"--demo_records must be at least 10, got {self.demo_records}")


@dataclass
class OptimConfig:
    max_steps: int | None = arg(None, "Optimizer steps to run; overrides num_epochs when both are set.")
    num_epochs: float | None = arg(None, "Epochs to run when max_steps is not set (default 1).")
    learning_rate: float = arg(2e-5, "Peak AdamW learning rate.")
    weight_decay: float = arg(0.0, "AdamW weight decay (not applied to biases and norms).")
    warmup_ratio: float = arg(0.03, "Share of the steps spent warming up linearly, then cosine decay.")
    min_lr_ratio: float = arg(0.1, "Cosine decay ends at learning_rate x min_lr_ratio.")
    max_grad_norm: float = arg(1.0, "Gradient clipping norm (0 turns clipping off).")
    mini_batch_size: int = arg(8, "Examples per forward pass on each process.")
    total_batch_size: int | None = arg(None, "Tokens per optimizer step; accumulation = total / (mini_batch_size x context_length x world size).")
    max_bad_steps: int = arg(3, "Stop after this many steps in a row with a non-finite loss or gradient norm (each is skipped, never applied).")
    seed: int = arg(42, "Seed for the split, the shuffling, the model init and everything else random.")

    def __post_init__(self):
        for name in ("max_steps", "mini_batch_size", "total_batch_size", "max_bad_steps"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise StepwiseError(f"--{name} must be positive, got {value}")
        if self.num_epochs is not None and self.num_epochs <= 0:
            raise StepwiseError(f"--num_epochs must be positive, got {self.num_epochs}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise StepwiseError(f"--learning_rate must be a positive number, got {self.learning_rate}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise StepwiseError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise StepwiseError(f"--min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise StepwiseError(f"--{name} must be >= 0, got {value}")


@dataclass
class EvalConfig:
    eval_freq: int = arg(100, "Steps between validation-loss evaluations.")
    eval_max_batches: int | None = arg(None, "Bound validation to this many mini batches (a fixed subset); None uses the whole set.")
    eval_prompts: str | None = arg(None, "Held-out prompt file generated on and scored at every checkpoint (samples.jsonl).")
    eval_num_prompts: int = arg(32, "How many held-out prompts (the first N) to generate on at each checkpoint.")
    eval_max_new_tokens: int = arg(96, "Generation length for the held-out prompts.")
    metric_for_best_model: str = arg("val_loss", "What picks the best checkpoint and drives early stopping: val_loss, an IF metric, rougeL or task_accuracy.")
    early_stopping_patience: int | None = arg(None, "Stop after this many evaluations without an improvement larger than the threshold.")
    early_stopping_threshold: float = arg(0.0, "The absolute improvement over the best so far that counts as one.")

    def __post_init__(self):
        if self.eval_prompts:  # eval_prompts/demo_ifeval.jsonl is found from any folder (a packaged file)
            self.eval_prompts = str(user_or_packaged(self.eval_prompts))
        if self.metric_for_best_model == "eval_loss":  # Hugging Face's name for the same thing
            self.metric_for_best_model = "val_loss"
        if self.metric_for_best_model not in METRICS:
            raise StepwiseError(
                f"--metric_for_best_model must be one of {', '.join(METRICS)}, got {self.metric_for_best_model!r}"
            )
        for name in ("eval_freq", "eval_num_prompts", "eval_max_new_tokens"):
            if getattr(self, name) <= 0:
                raise StepwiseError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.eval_max_batches is not None and self.eval_max_batches <= 0:
            raise StepwiseError(f"--eval_max_batches must be positive, got {self.eval_max_batches}")
        if self.early_stopping_patience is not None and self.early_stopping_patience <= 0:
            raise StepwiseError(f"--early_stopping_patience must be positive, got {self.early_stopping_patience}")
        if self.early_stopping_threshold < 0:
            raise StepwiseError(f"--early_stopping_threshold must be >= 0, got {self.early_stopping_threshold}")


@dataclass
class CheckpointConfig:
    checkpoint_freq: int = arg(500, "Steps between checkpoints (step-NNNNNN/).")
    save_total_limit: int | None = arg(None, "Keep at most this many checkpoints: the best plus the newest others (None keeps all).")
    load_best_model_at_end: bool = arg(True, "Write the best checkpoint (by metric_for_best_model) to final/ at the end.")

    def __post_init__(self):
        if self.checkpoint_freq <= 0:
            raise StepwiseError(f"--checkpoint_freq must be positive, got {self.checkpoint_freq}")
        if self.save_total_limit is not None and self.save_total_limit <= 0:
            raise StepwiseError(f"--save_total_limit must be positive, got {self.save_total_limit}")


@dataclass
class RunConfig:
    output_dir: str = arg("checkpoints", "Folder that holds one folder per run.")
    run_name: str | None = arg(None, "Run folder name; default: the config's name and the start time (with --resume: the newest run).")
    resume: bool = arg(False, "Continue the run from its newest complete checkpoint.")
    use_tensorboard: bool = arg(True, "Write TensorBoard event files under <run>/tensorboard/.")
    log_freq: int = arg(10, "Steps between train-loss log entries.")
    progress: bool = arg(True, "Show the rich progress bar (off when stdout is not a terminal).")

    def __post_init__(self):
        if self.log_freq <= 0:
            raise StepwiseError(f"--log_freq must be positive, got {self.log_freq}")


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "eval": EvalConfig,
    "checkpoint": CheckpointConfig,
    "run": RunConfig,
}

# Hugging Face TrainingArguments spellings -> Stepwise names.
ALIASES = {
    "num_train_epochs": "num_epochs",
    "eval_steps": "eval_freq",
    "save_steps": "checkpoint_freq",
    "logging_steps": "log_freq",
    "per_device_train_batch_size": "mini_batch_size",
    "max_seq_length": "context_length",
    "max_length": "context_length",
    "model_name_or_path": "pretrained_model",
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    config_name: str = arg("default", "Stem of the YAML file it came from, used in the default run name.")

    @property
    def world_size(self) -> int:
        return int(os.environ.get("WORLD_SIZE", "1"))

    @property
    def grad_accum_steps(self) -> int:
        tokens_per_micro = self.optim.mini_batch_size * self.data.context_length * self.world_size
        return (self.optim.total_batch_size or tokens_per_micro) // tokens_per_micro

    def validate(self) -> None:
        """Checks that span concerns; each names the flag to change."""
        o, d, e, c = self.optim, self.data, self.eval, self.checkpoint
        per_step = o.mini_batch_size * d.context_length * self.world_size
        if o.total_batch_size is not None and o.total_batch_size % per_step:
            raise StepwiseError(
                f"--total_batch_size {o.total_batch_size} is not a multiple of mini_batch_size x context_length "
                f"x world size = {o.mini_batch_size} x {d.context_length} x {self.world_size} = {per_step}"
            )
        wants_best = c.load_best_model_at_end or c.save_total_limit is not None or e.early_stopping_patience
        if wants_best and e.metric_for_best_model == "val_loss" and c.checkpoint_freq % e.eval_freq:
            raise StepwiseError(
                f"--checkpoint_freq {c.checkpoint_freq} must be a multiple of --eval_freq {e.eval_freq} "
                "so every checkpoint has a validation loss to pick the best by"
            )
        if e.metric_for_best_model != "val_loss" and not e.eval_prompts:
            raise StepwiseError(f"--metric_for_best_model {e.metric_for_best_model} needs --eval_prompts FILE")
        if wants_best and e.metric_for_best_model == "val_loss" and d.val_fraction == 0 and not d.val_dataset:
            raise StepwiseError("--val_fraction 0 leaves no validation set to pick the best checkpoint by; "
                                "give --val_dataset FILE or --load_best_model_at_end false")

    def to_dict(self) -> dict:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out["config_name"] = self.config_name
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def config_fields() -> dict[str, tuple[str, dataclasses.Field]]:
    """Every flag name -> (section, field)."""
    return {f.name: (section, f) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


def _base_type(cls: type, name: str) -> tuple[type, bool]:
    """(int|float|str|bool, optional?) of a field such as `max_steps: int | None`."""
    hint = typing.get_type_hints(cls)[name]
    if isinstance(hint, types.UnionType):
        args = [a for a in hint.__args__ if a is not type(None)]
        return args[0], True
    return hint, False


def _coerce(name: str, value, where: str):
    """Check a YAML value's type against the field's, naming the key on a mismatch."""
    section, _ = config_fields()[name]
    kind, optional = _base_type(SECTIONS[section], name)
    if value is None:
        if optional:
            return None
        raise StepwiseError(f"{where}: key {name!r} may not be empty")
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[kind]
    if not ok:
        raise StepwiseError(f"{where}: key {name!r} must be {kind.__name__}, got {value!r}")
    return float(value) if kind is float else value


def read_yaml(path: str) -> dict:
    """Flat {field: value} from a YAML file, sections flattened and aliases resolved."""
    p = Path(path)
    if p.is_dir():
        raise StepwiseError(f"--config {path}: is a folder, not a YAML file")
    if not p.is_file():
        raise StepwiseError(f"--config {path}: no such file")
    try:
        data = p.read_bytes()
    except OSError as err:
        raise StepwiseError(f"--config {path}: cannot read ({err.strerror or err})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:  # a binary file, or text saved in another encoding
        line = data.count(b"\n", 0, err.start) + 1
        raise StepwiseError(f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x}); "
                            "a config is a UTF-8 YAML file") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.reader.ReaderError as err:  # a control character such as NUL: binary data, not YAML
        line = text.count("\n", 0, err.position) + 1
        raise StepwiseError(f"{path}:{line}: not YAML text (character #x{err.character:04x} is not allowed)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        why = (str(getattr(err, "problem", None) or err).strip().splitlines() or ["unreadable"])[0]
        raise StepwiseError(f"{path}{line}: invalid YAML ({why})") from None
    if not isinstance(raw, dict):
        raise StepwiseError(f"{path}: expected a mapping of keys to values")
    fields = config_fields()
    flat: dict = {}

    def take(key: str, value, section: str | None):
        name = ALIASES.get(key, key)
        where = f"{path} ({section})" if section else path
        if name not in fields:
            raise StepwiseError(f"{where}: unknown key {key!r}")
        flat[name] = _coerce(name, value, where)

    for key, value in raw.items():
        if key == "config_name":  # written into every run's config.yaml, so that file can be reused
            continue
        if isinstance(value, dict):
            for sub_key, sub_value in value.items():
                take(str(sub_key), sub_value, key)
        else:
            take(str(key), value, None)
    return flat


# `python -m trainer train` with no --config is the embedded default: with the demo model, every
# setting not given comes from this preset (a tiny model from scratch wants other numbers than the
# dataclass defaults, which suit fine-tuning a pretrained model).
DEMO_PRESET = data_path("configs/demo.yaml")


def with_preset(values: dict, config_name: str) -> tuple[dict, str]:
    """The demo preset under the given values, when no config file was given and the model is the demo."""
    if config_name != "default" or values.get("pretrained_model", "demo") != "demo" or not DEMO_PRESET.is_file():
        return values, config_name
    return {**read_yaml(str(DEMO_PRESET)), **values}, DEMO_PRESET.stem


# A resumed run keeps what decides its data order and its model: changing any of these would make
# the continuation a different run, not the same one picked up again.
FIXED_ON_RESUME = ("pretrained_model", "lora_r", "lora_alpha", "lora_target_modules", "dataset", "val_dataset", "val_fraction", "context_length", "demo_records",
                   "seed", "mini_batch_size", "total_batch_size")


def resumed(saved: Config, given: dict) -> Config:
    """A run's saved config with the values given now on top (a longer --max_steps, say)."""
    before = flatten(saved)
    for name in FIXED_ON_RESUME:
        if name in given and given[name] != before[name]:
            raise StepwiseError(f"--{name}: the run was trained with {before[name]!r}; a resumed run keeps it "
                                f"(start a new --run_name to change it)")
    return from_flat({**before, **given, "resume": True}, saved.config_name)


def saved_run_config(given: dict) -> Path | None:
    """The config.yaml of the run that --resume continues (--run_name, or the newest run), if any."""
    out = Path(given.get("output_dir", RunConfig.output_dir))
    if given.get("run_name"):
        path = out / given["run_name"] / "config.yaml"
    else:
        runs = list_runs(out)
        path = runs[0].path / "config.yaml" if runs else None
    return path if path is not None and path.is_file() else None


def resolve(given: dict, config_name: str = "default") -> Config:
    """The one resolution: defaults (or the demo preset) < YAML < flags, validated; with --resume,
    the run's own saved config < the flags given now, validated against that config."""
    saved = saved_run_config(given) if given.get("resume") else None
    if saved is not None:
        return resumed(load_saved(saved), given)
    return from_flat(*with_preset(given, config_name))


def flatten(cfg: Config) -> dict:
    return {k: v for section in SECTIONS for k, v in dataclasses.asdict(getattr(cfg, section)).items()}


def from_flat(values: dict, config_name: str = "default") -> Config:
    fields = config_fields()
    per_section: dict[str, dict] = {section: {} for section in SECTIONS}
    for name, value in values.items():
        per_section[fields[name][0]][name] = value
    cfg = Config(**{s: SECTIONS[s](**kw) for s, kw in per_section.items()}, config_name=config_name)
    cfg.validate()
    return cfg


def load_saved(path: str | Path) -> Config:
    """The resolved config saved in a run folder (config.yaml), re-validated. Its last line is
    config_name (Config.to_dict writes it last), so a file cut short is told apart from a complete one."""
    if not Path(path).is_file():
        raise StepwiseError(f"{path}: missing saved run config")
    values = read_yaml(str(path))  # a damaged file is one line naming it
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if "config_name" not in raw:
        raise StepwiseError(f"{path}: incomplete saved run config (cut short?); restore it or start a new --run_name")
    return from_flat(values, raw["config_name"])
