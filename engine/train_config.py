"""The training run's configuration: dataclasses loaded from TOML or YAML, overridden from the command
line (section.key=value), validated up front with messages that name the key and the value."""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    pass


@dataclass
class ModelSection:
    path: str = ""                  # a Hugging Face Qwen2 checkpoint directory (config.json + safetensors)
    dtype: str = "float32"          # dtype of the stored (master) weights
    compute_dtype: str = "auto"     # auto: bfloat16 on CUDA, float32 on the CPU
    activation_checkpointing: bool = False
    exact: bool = False             # batch-invariant matmuls (sampler and trainer log-probs bit-identical)


@dataclass
class DataSection:
    train_files: list[str] = field(default_factory=list)  # JSONL: trajectory records or {"messages", "tools"}
    tokenizer: str = ""             # directory with tokenizer.json (default: the model's directory)
    max_seq_len: int = 32768
    long_policy: str = "truncate"   # truncate | drop samples longer than max_seq_len
    bad_line_policy: str = "error"  # error | skip malformed JSONL lines (reported with file:line)
    shuffle: bool = True


@dataclass
class TrainSection:
    steps: int = 100                # optimizer steps
    global_batch_size: int = 32     # samples per optimizer step, over all ranks
    micro_batch_tokens: int = 32768 # token budget of one packed micro-batch
    lr: float = 1e-5
    min_lr_ratio: float = 0.1       # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0          # max global gradient norm (0: off)


@dataclass
class CheckpointSection:
    every: int = 0                  # steps between checkpoints (0: only at the end)
    keep_last: int = 2
    max_shard_size: str = "5GB"


@dataclass
class LogSection:
    every: int = 1
    progress: bool = True           # a progress bar on rank 0
    peak_tflops: float = 0.0        # per device, for MFU (0: 989 on CUDA (H100 bf16 dense), none on CPU)


@dataclass
class TrainConfig:
    phase: str = "sft"
    output_dir: str = "runs/sft"
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_CHOICES = {
    "phase": ("sft",),
    "device": ("auto", "cpu", "cuda"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.compute_dtype": ("auto", "float32", "bfloat16", "float16"),
    "data.long_policy": ("truncate", "drop"),
    "data.bad_line_policy": ("error", "skip"),
}
_POSITIVE = ("data.max_seq_len", "train.steps", "train.global_batch_size", "train.micro_batch_tokens",
             "checkpoint.keep_last", "log.every")
_NON_NEGATIVE = ("train.lr", "train.warmup_steps", "train.weight_decay", "train.grad_clip", "checkpoint.every",
                 "log.peak_tflops")

# Hugging Face TrainingArguments names, so that a key written for HF gets our name as its suggestion.
_ALIASES = {"learning_rate": "lr", "max_steps": "steps", "max_grad_norm": "grad_clip"}


def _fill(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ConfigError(f"config: {prefix.rstrip('.') or 'top level'} must be a table, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            aliases = {a: n for a, n in _ALIASES.items() if n in names}
            close = difflib.get_close_matches(key, [*names, *aliases], n=1)
            hint = (f"; did you mean '{prefix}{aliases.get(close[0], close[0])}'?" if close
                    else f"; known: {sorted(names)}")
            raise ConfigError(f"config: unknown key '{prefix}{key}'{hint}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = _fill(kind, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, kind, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(value, kind, name):
    origin = typing.get_origin(kind)
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"config: {name} must be a list, got {value!r}")
        return [_coerce(v, typing.get_args(kind)[0], name) for v in value]
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config: {name} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config: {name} must be an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"config: {name} must be a finite number, got {value!r}")  # TOML has nan and inf
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"config: {name} must be a string, got {value!r}")
    return value


def _validate(cfg: TrainConfig):
    def get(name):
        obj = cfg
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj

    for name, choices in _CHOICES.items():
        if get(name) not in choices:
            raise ConfigError(f"config: {name} = {get(name)!r}; expected one of {list(choices)}")
    for name in _POSITIVE:
        if get(name) <= 0:
            raise ConfigError(f"config: {name} must be > 0, got {get(name)!r}")
    for name in _NON_NEGATIVE:
        if get(name) < 0:
            raise ConfigError(f"config: {name} must be >= 0, got {get(name)!r}")
    if not 0.0 <= cfg.train.min_lr_ratio <= 1.0:
        raise ConfigError(f"config: train.min_lr_ratio must be in [0, 1], got {cfg.train.min_lr_ratio!r}")
    if not cfg.model.path:
        raise ConfigError("config: model.path is required (a Hugging Face Qwen2 checkpoint directory)")
    if not cfg.data.train_files:
        raise ConfigError("config: data.train_files is empty (JSONL files of trajectories or chat messages)")
    from engine.checkpoint import parse_size  # checked now, not at the first checkpoint hours later
    try:
        parse_size(cfg.checkpoint.max_shard_size)
    except ValueError as e:
        raise ConfigError(f"config: checkpoint.{e}") from None
    if cfg.train.micro_batch_tokens < cfg.data.max_seq_len:
        raise ConfigError(f"config: train.micro_batch_tokens ({cfg.train.micro_batch_tokens}) must be >= "
                          f"data.max_seq_len ({cfg.data.max_seq_len}) so that every sample fits a micro-batch")


def parse_override(text: str) -> tuple[list[str], object]:
    """'train.lr=3e-4' -> (['train', 'lr'], 3e-4). The value is read as a TOML value, else as a string."""
    if "=" not in text:
        raise ConfigError(f"config override {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml
                values = yaml.safe_load(text) or {}
            else:
                values = tomllib.loads(text)
        except Exception as e:  # the parsers' own messages carry line and column
            raise ConfigError(f"config file {path}: {e}") from None
    for text in overrides:
        keys, value = parse_override(text)
        node = values
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config override {text!r}: {k} is not a section")
        node[keys[-1]] = value
    cfg = _fill(TrainConfig, values, "")
    _validate(cfg)
    return cfg


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """The resolved config, as JSON (every default made explicit)."""
    Path(path).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
