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
    # dtype of the weights in a checkpoint's model/ folder (the Hugging Face copy, for serving and evaluation).
    # auto: the model's own, as its config.json states it (bfloat16 for Qwen2.5; the master dtype if it states
    # none). The fp32 master weights stay in train_state/, which is what a resume reads: resumes stay exact.
    dtype: str = "auto"


@dataclass
class LogSection:
    every: int = 1
    progress: bool = True           # a progress bar on rank 0
    peak_tflops: float = 0.0        # per device, for MFU (0: 989 on CUDA (H100 bf16 dense), none on CPU)
    sampler_trace: bool = False     # GRPO: each sampler step's time and running batch, and the step's phases,
                                    # to sampler_trace/rank_R.jsonl (schedule studies: benchmarks/grpo_step_sim.py)


@dataclass
class RLSection:
    """Phase 2 (GRPO on agent rollouts); defaults are the method's (../shared/reference/method.md)."""
    tasks: str = ""                 # SWE-bench-format task file (default: the bundled tasks)
    prompts_per_step: int = 4       # tasks per step, over all ranks
    group_size: int = 6             # G: trajectories per task (a group stays on one rank)
    stages: list[str] = field(default_factory=lambda: ["1-80", "81-160"])   # curriculum: Stage I, Stage II
    backend: str = "auto"           # auto (Docker when it answers, else sandbox) | docker | sandbox
    max_envs: int = 32              # environments (containers) at once per rank
    docker_hosts: list[str] = field(default_factory=list)   # this rank's Docker hosts (URLs); empty: DOCKER_HOST
    max_envs_per_host: int = 16     # environments at once on one Docker host (rollout/envs/hosts.py)
    warm_envs: int = 4              # containers started ahead of the trajectories that need them (0: none)
    pull_images: bool = False       # missing task images: pulled at start (else the run is refused, naming them)
    base_image: str = "debootstrap"  # base of the bundled tasks' images (or a registry image: python:3.11-slim)
    expert: str = "oracle"          # oracle | anthropic | none
    expert_model: str = "claude-sonnet-4-5"
    max_steps: int = 60
    max_context_tokens: int = 32768
    max_turn_tokens: int = 2048
    max_seconds: float = 1800.0     # wall-clock limit per trajectory
    command_timeout_s: float = 120.0
    expert_quota: int = 6
    expert_budget_usd: float = 2.0
    temperature: float = 1.0
    top_p: float = 1.0
    mask_truncated: bool = False    # trajectories that hit a limit: masked out of the update (else scored)
    drop_zero_variance: bool = False  # DAPO dynamic sampling: groups whose rewards are all equal are dropped
    eps_low: float = 0.2
    eps_high: float = 0.28
    kl_coef: float = 0.001          # the method's default (the paper leaves it unknown); 0: no reference loaded
    reference: str = ""             # the frozen reference (default: model.path, the SFT checkpoint)
    reference_offload: bool = False  # its shards in CPU memory, brought to the GPU a layer at a time
    mini_batches: int = 1           # optimizer steps per RL step
    recompute_logprobs: bool = True   # fast mode: old log-probs from the trainer, with the rollout weights once
                                      # before any update (exact mode: the sampler's)
    tis_cap: float = 2.0            # truncated importance weight on trainer/sampler probability (0: off)
    kv_cache_fraction: float = 0.8  # of the memory free when the pool is built (CUDA)


@dataclass
class TrainConfig:
    phase: str = "sft"
    output_dir: str = "runs/sft"
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda
    # How long a rank may wait in a collective, in seconds (0: derived, process_group_timeout). In GRPO the
    # ranks meet again only after every rank's rollout phase, which lasts up to rl.max_seconds per trajectory
    # (checked between turns: + one command) plus its evaluation in a fresh environment, per round of
    # rl.max_envs trajectories; NCCL's default (10 minutes) would abort the ranks that finished first. A value
    # given is checked against that bound.
    process_group_timeout_s: float = 0.0
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    rl: RLSection = field(default_factory=RLSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_CHOICES = {
    "phase": ("sft", "grpo"),
    "rl.backend": ("auto", "docker", "sandbox"),
    "rl.expert": ("oracle", "anthropic", "none"),
    "device": ("auto", "cpu", "cuda"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.compute_dtype": ("auto", "float32", "bfloat16", "float16"),
    "checkpoint.dtype": ("auto", "float32", "bfloat16", "float16"),
    "data.long_policy": ("truncate", "drop"),
    "data.bad_line_policy": ("error", "skip"),
}
_POSITIVE = ("data.max_seq_len", "train.steps", "train.global_batch_size", "train.micro_batch_tokens",
             "checkpoint.keep_last", "log.every", "rl.prompts_per_step", "rl.max_envs", "rl.max_steps",
             "rl.max_context_tokens", "rl.max_turn_tokens", "rl.max_seconds", "rl.command_timeout_s",
             "rl.expert_budget_usd", "rl.mini_batches", "rl.kv_cache_fraction", "rl.max_envs_per_host")
_NON_NEGATIVE = ("process_group_timeout_s", "train.lr", "train.warmup_steps", "train.weight_decay",
                 "train.grad_clip", "checkpoint.every", "log.peak_tflops", "rl.expert_quota", "rl.eps_low",
                 "rl.eps_high", "rl.kl_coef", "rl.tis_cap", "rl.warm_envs")

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
    if cfg.phase == "grpo":
        _validate_rl(cfg.rl)
    elif not cfg.model.path:
        raise ConfigError("config: model.path is required (a Hugging Face Qwen2 checkpoint directory)")
    elif not cfg.data.train_files:
        raise ConfigError("config: data.train_files is empty (JSONL files of trajectories or chat messages)")
    from protege.engine.checkpoint import parse_size  # checked now, not at the first checkpoint hours later
    try:
        parse_size(cfg.checkpoint.max_shard_size)
    except ValueError as e:
        raise ConfigError(f"config: checkpoint.{e}") from None
    if cfg.phase == "sft" and cfg.train.micro_batch_tokens < cfg.data.max_seq_len:
        raise ConfigError(f"config: train.micro_batch_tokens ({cfg.train.micro_batch_tokens}) must be >= "
                          f"data.max_seq_len ({cfg.data.max_seq_len}) so that every sample fits a micro-batch")


def _validate_rl(rl: RLSection) -> None:
    if rl.group_size < 2:
        raise ConfigError(f"config: rl.group_size must be >= 2 (a group advantage needs two samples), "
                          f"got {rl.group_size}")
    if not rl.temperature > 0:
        raise ConfigError(f"config: rl.temperature = {rl.temperature!r}: GRPO needs a sampling temperature > 0 "
                          f"(0 is greedy decoding: no sampling distribution for the probability ratio)")
    if not 0 < rl.top_p <= 1:
        raise ConfigError(f"config: rl.top_p must be in (0, 1], got {rl.top_p}")
    curriculum(rl)


# The longest a rollout's evaluation can take (rollout/evaluate.py): the patch apply's limit + the test run's
# (evaluate_patch's default timeout, which rl.py uses).
EVALUATION_SECONDS = 300.0 + 1800.0
# Beyond the trajectories' own limits: environments started and closed, a last model turn, the judge, the
# rollout-mode switch.
ROLLOUT_MARGIN_SECONDS = 600.0
# SFT's longest wait: the other ranks at a barrier while rank 0 alone writes a checkpoint's model/ copy (15 GB
# for a 7B model in bf16: minutes on a slow disk).
SFT_PROCESS_GROUP_TIMEOUT_S = 1800.0


def rollout_phase_seconds(rl: RLSection, world_size: int) -> float:
    """The longest one rank's rollout phase can last: its G x ceil(P / world) trajectories run rl.max_envs at
    a time, each within rl.max_seconds + one command + its evaluation."""
    jobs = rl.group_size * -(-rl.prompts_per_step // world_size)
    rounds = -(-jobs // min(rl.max_envs, jobs))
    return rounds * (rl.max_seconds + rl.command_timeout_s + EVALUATION_SECONDS) + ROLLOUT_MARGIN_SECONDS


def process_group_timeout(cfg: TrainConfig, world_size: int) -> float:
    """Seconds a rank may wait in a collective: process_group_timeout_s, or (0) what the phase needs; in GRPO a
    value shorter than a rank's longest rollout phase is refused (it would abort the ranks that wait)."""
    if cfg.phase != "grpo":
        return cfg.process_group_timeout_s or SFT_PROCESS_GROUP_TIMEOUT_S
    need = rollout_phase_seconds(cfg.rl, world_size)
    if cfg.process_group_timeout_s == 0:
        return need
    if cfg.process_group_timeout_s < need:
        raise ConfigError(f"config: process_group_timeout_s = {cfg.process_group_timeout_s:g} s is shorter than "
                          f"a rank's rollout phase can last on {world_size} rank(s) ({need:g} s: rl.max_seconds + "
                          f"rl.command_timeout_s + evaluation per round of rl.max_envs trajectories, + margin): "
                          f"ranks waiting for it would abort; raise it or set 0 (derived)")
    return cfg.process_group_timeout_s


def curriculum(rl: RLSection):
    """rl.stages ("first-last" step ranges of Stage I, Stage II) as a rewards.Curriculum."""
    from protege.rewards.curriculum import STAGE_I_OVERRIDES, STAGE_II_OVERRIDES, Curriculum, Stage
    from protege.rewards.shaping import RewardConfig

    if len(rl.stages) != 2:
        raise ConfigError(f"config: rl.stages must name the two stages' step ranges, e.g. [\"1-80\", \"81-160\"]; "
                          f"got {rl.stages!r}")
    ranges = []
    for text in rl.stages:
        try:
            first, last = (int(x) for x in text.split("-"))
        except ValueError:
            raise ConfigError(f"config: rl.stages entry {text!r} is not a step range like \"1-80\"") from None
        ranges.append((first, last))
    base = RewardConfig()
    stages = [Stage("I", *ranges[0], base.with_overrides(**STAGE_I_OVERRIDES)),
              Stage("II", *ranges[1], base.with_overrides(**STAGE_II_OVERRIDES))]
    if ranges[0][0] != 1:
        raise ConfigError(f"config: rl.stages: Stage I must start at step 1, got {rl.stages[0]!r}")
    try:
        return Curriculum(stages)
    except ValueError as e:
        raise ConfigError(f"config: rl.stages = {rl.stages!r}: {e}") from None


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
