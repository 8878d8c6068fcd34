"""Phase 2: GRPO on agent rollouts, rollout and update in one process per GPU on the same (FSDP2) weights.

One step: the next prompts_per_step tasks of a seeded order, each run group_size times; ranks split the
groups. In rollout mode every trajectory of the rank runs at once (a thread each, environments bounded),
its model turns decoded together by the in-process sampler with a seed derived from (run seed, step, task
slot, sample, turn). Each finished trajectory is judged, evaluated in a fresh environment, scored with the
curriculum stage of the step and appended to rollouts/step_N.jsonl. Then group advantages, and mini-batch
updates of the clipped token-level loss on the policy's own tokens (engine/training/grpo.py). A step resumed
with --resume reuses the trajectories its file already holds and re-runs the others with the same seeds;
rollouts/identity.json (run_identity) must match the run, and a fresh start never reuses stored rollouts."""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from protege.kernels import dispatch as kernels
from protege.rewards.shaping import RewardBreakdown, score as shaped_score
from protege.rewards.stats import aggregate
from protege.engine.checkpoint import write_atomically
from protege.engine.config import ModelConfig
from protege.engine.model import Qwen2ForCausalLM
from protege.engine.tokenizer import Tokenizer
from protege.engine.training.config import ConfigError, TrainConfig, curriculum, save_config
from protege.engine.training.data import GlobalBatches
from protege.engine.training.grpo import group_advantages, policy_loss, usable_groups
from protege.engine.optional import pyplot
from protege.engine.training.metrics import MetricsLog
from protege.engine.training.packing import pack
from protege.engine.training.parallelize import (RolloutMode, build_training_model, reshard_after_every_forward,
                                                 training_dtypes)
from protege.engine.training.resume import latest_checkpoint, load_training_checkpoint, resume_point, save_training_checkpoint
from protege.engine.training.runtime import Runtime, all_reduce, barrier
from protege.engine.training.sft import lr_lambda
from protege.engine.training.tiny import make_tiny_base
from protege.rollout.agent.expert import failed_reply
from protege.rollout.agent.judge import JudgeScores
from protege.rollout.agent.loop import AgentConfig, Job, run_batch
from protege.rollout.agent.policies import SamplerPolicy, derive_seed
from protege.rollout.agent.trajectory import Trajectory
from protege.rollout.envs.fleet import Fleet, FleetConfig
from protege.rollout.envs.prepare import MissingImages
from protege.rollout.sampler import Sampler, SamplingParams
from protege.rollout.sampler.server import SamplerServer
from protege.rollout.tasks import BUNDLED_JSONL, TaskFormatError, load_tasks

TRUNCATED = ("context", "max_turn_tokens", "max_steps", "time")   # terminations that cut a trajectory short


class TokenLogprobs(nn.Module):
    """The model and its head + log-softmax as one module (the FSDP root): log p(target) and the entropy at
    the given rows only -- the policy's tokens (tool output, most of an agent trajectory, needs no head).
    `temperature` has no default: the ratio is only right at the temperature the sampler drew with (its
    log-probs are of softmax(z / T)), so every caller names it."""

    def __init__(self, model: Qwen2ForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids, cu_seqlens, rows, targets, *, temperature: float):
        hidden = self.model(input_ids, cu_seqlens=cu_seqlens, return_hidden=True)
        return kernels.token_logprobs(hidden[rows], self.model.lm_head_weight, targets, temperature=temperature,
                                      return_entropy=True)


@dataclass
class Rollout:
    """One finished trajectory of a step, as stored in rollouts/step_N.jsonl."""
    slot: int                 # the task's position in the run's task order
    sample: int               # 0 .. group_size - 1
    seed: int
    trajectory: Trajectory
    reward: dict              # RewardBreakdown.to_dict()

    def to_dict(self, step: int, weight_version: int, sampling: dict) -> dict:
        return {"step": step, "slot": self.slot, "sample": self.sample, "seed": self.seed,
                "weight_version": weight_version, "sampling": sampling, "reward": self.reward,
                "trajectory": self.trajectory.to_dict()}


@dataclass
class Sample:
    """A trajectory as a training sequence: its ids as generated, and per policy token (the rows whose next
    token the policy produced) the target, the sampler's log-prob and the advantage."""
    ids: list[int]
    rows: list[int]
    targets: list[int]
    sampler_logprobs: list[float]
    advantage: float


class NoExpert:
    name = "none"

    def ask(self, task, recent, question):
        return failed_reply("no expert in this run")

    def judge(self, task, case):
        return JudgeScores(None, None, fallback=True, note="no expert")


def run_grpo(cfg: TrainConfig, runtime: Runtime, resume: bool) -> dict:
    tasks = _load_tasks(cfg.rl.tasks)
    fleet = _fleet(cfg.rl, tasks)   # first: a missing task image refuses the run here, before any work
    try:
        return _run_grpo(cfg, runtime, resume, tasks, fleet)
    finally:
        fleet.close()


def _fleet(rl, tasks: list) -> Fleet:
    backend = rl.backend if rl.backend != "auto" else ("sandbox" if shutil.which("bwrap") else "docker")
    config = FleetConfig(backend=backend, docker_hosts=list(rl.docker_hosts), max_envs_per_host=rl.max_envs_per_host,
                         warm_envs=rl.warm_envs, pull_images=rl.pull_images, base_image=rl.base_image)
    try:
        return Fleet(config, tasks, log=lambda message: print(message, flush=True))
    except (MissingImages, ValueError) as e:
        raise ConfigError(f"config: rl.tasks = {rl.tasks or str(BUNDLED_JSONL)!r}, rl.docker_hosts = "
                          f"{rl.docker_hosts!r}: {e}") from None


def _run_grpo(cfg: TrainConfig, runtime: Runtime, resume: bool, tasks: list, fleet: Fleet) -> dict:
    rl, t = cfg.rl, cfg.train
    run_dir = Path(cfg.output_dir)
    checkpoint = resume_point(run_dir, resume, runtime)
    _refuse_fresh_start_over_rollouts(run_dir, resume)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    stages = curriculum(rl)
    base = cfg.model.path or str(_tiny_base(run_dir / "base-model", cfg.seed, runtime))
    tokenizer = Tokenizer.from_dir(cfg.data.tokenizer or base)
    identity = run_identity(cfg, base, stages)
    if resume:
        _check_stored_identity(run_dir, identity)

    dtype, compute_dtype = training_dtypes(cfg.model, runtime.device)
    model, root = build_training_model(base, dtype, compute_dtype, runtime,
                                       cfg.model.activation_checkpointing, TokenLogprobs)
    model.exact = cfg.model.exact
    reference = _reference(cfg, base, model.config, compute_dtype, runtime) if rl.kl_coef > 0 else None
    optimizer = torch.optim.AdamW(root.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                                  weight_decay=t.weight_decay, fused=runtime.device.type == "cuda")
    total_updates = t.steps * rl.mini_batches
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, t.warmup_steps, total_updates, t.min_lr_ratio))
    order = GlobalBatches(len(tasks), rl.prompts_per_step, cfg.seed)
    step, position = 0, 0
    if checkpoint is not None:
        state = load_training_checkpoint(checkpoint, root, optimizer, runtime)
        step, position = state["step"], state["task_position"]
        scheduler.load_state_dict(state["scheduler"])
        model.weight_version += 1
    if runtime.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "rollouts").mkdir(exist_ok=True)
        write_atomically(str(run_dir / "rollouts" / IDENTITY),   # a crash never leaves it torn
                         lambda tmp: Path(tmp).write_text(json.dumps(identity, indent=2) + "\n"))
        save_config(cfg, run_dir / "config.json")
        log = MetricsLog(run_dir / "metrics.jsonl", resume_step=step if checkpoint is not None else None)
        print(f"GRPO: {len(tasks)} tasks, {rl.prompts_per_step} x {rl.group_size} trajectories per step, "
              f"{runtime.world_size} rank(s) on {runtime.device.type}, steps {step}->{t.steps}"
              + (f" (resumed from {checkpoint})" if checkpoint is not None else ""), flush=True)
    barrier(runtime)

    sampler = Sampler(model, kv_cache_fraction=rl.kv_cache_fraction, eos_token_ids=tokenizer.eos_ids,
                      max_model_len=min(rl.max_context_tokens, model.config.max_position_embeddings))
    rollout_mode = RolloutMode(root, model, sampler)
    expert = _expert(rl)
    agent = AgentConfig(max_steps=rl.max_steps, max_context_tokens=rl.max_context_tokens,
                        command_timeout_s=rl.command_timeout_s, expert_quota=rl.expert_quota,
                        expert_budget_usd=rl.expert_budget_usd, max_seconds=rl.max_seconds, judge=rl.expert != "none")
    params = SamplingParams(temperature=rl.temperature, top_p=rl.top_p, max_tokens=rl.max_turn_tokens)
    trace = _StepTrace(run_dir, runtime.rank, sampler) if cfg.log.sampler_trace else None
    summary = {}
    scheduled_ahead = False
    plot = run_dir / "grpo.png" if (run_dir / "grpo.png").exists() else None   # a resumed run's, so far
    while step < t.steps:
        step_no = step + 1
        stage = stages.stage_at(step_no)
        started = time.perf_counter()
        if trace is not None:
            trace.begin(step_no, started)
        slots = list(range(position, position + rl.prompts_per_step))
        task_of = dict(zip(slots, order.indices(position)))
        mine = slots[runtime.rank::runtime.world_size]
        rollouts_path = run_dir / "rollouts" / f"step_{step_no}.jsonl"
        reused = _stored_rollouts(rollouts_path, step_no, set(mine))
        optimizer.zero_grad(set_to_none=True)
        stats_before = replace(sampler.stats)

        def score(slot: int, sample: int, seed: int, traj: Trajectory) -> Rollout:
            breakdown = shaped_score(traj.reward_input(), stage.reward, stage.name)
            return Rollout(slot, sample, seed, traj, breakdown.to_dict())

        results: dict[tuple[int, int], Rollout] = dict(reused)
        server = SamplerServer(sampler)
        jobs, key_of = [], {}
        for slot in mine:
            for sample in range(rl.group_size):
                if (slot, sample) not in results:
                    seed = derive_seed(cfg.seed, step_no, slot, sample)
                    jobs.append(Job(tasks[task_of[slot]], SamplerPolicy(server, params, seed=seed), attempt=sample))
                    key_of[id(jobs[-1])] = (slot, sample, seed)
        if not scheduled_ahead:
            fleet.schedule([job.task for job in jobs])   # later steps' are scheduled a step ahead
        t_rollout = time.perf_counter()
        with rollout_mode, open(rollouts_path, "a", encoding="utf-8") as sink:
            version = model.weight_version
            sampling = {"temperature": rl.temperature, "top_p": rl.top_p, "max_tokens": rl.max_turn_tokens}

            def finished(job: Job, traj: Trajectory) -> None:
                r = score(*key_of[id(job)], traj)
                line = json.dumps(r.to_dict(step_no, version, sampling), ensure_ascii=False) + "\n"
                os.write(sink.fileno(), line.encode())   # one write per line: ranks never interleave a line
                os.fsync(sink.fileno())
                results[(r.slot, r.sample)] = r
                if os.environ.get("PROTEGE_FAULT") == f"die-in-rollout-{step_no}":   # fault injection for tests
                    os._exit(137)

            run_batch(jobs, fleet.open, expert, tokenizer, agent, concurrency=max(1, min(rl.max_envs, len(jobs))),
                      evaluate=lambda task, patch: fleet.evaluate(task, patch).to_dict(), on_done=finished)
            server.close()
        scheduled_ahead = step + 1 < t.steps
        if scheduled_ahead:   # the next step's containers start while this one trains
            upcoming = list(range(position + rl.prompts_per_step, position + 2 * rl.prompts_per_step))
            nxt = dict(zip(upcoming, order.indices(position + rl.prompts_per_step)))
            fleet.schedule([tasks[nxt[slot]] for slot in upcoming[runtime.rank::runtime.world_size]
                            for _ in range(rl.group_size)])
        rollout_seconds = time.perf_counter() - t_rollout
        if trace is not None:
            trace.phase("rollout", t_rollout, time.perf_counter())
        switch = rollout_mode.last_switch

        # Advantages per group; a group is all on this rank.
        samples, counts = _training_samples([[results[(s, i)] for i in range(rl.group_size)] for s in mine], rl)

        t_train = time.perf_counter()
        train_stats = _update(cfg, runtime, root, reference, optimizer, scheduler, samples, model)
        model.weight_version += 1
        training_seconds = time.perf_counter() - t_train
        if trace is not None:
            trace.phase("training", t_train, time.perf_counter())
        step += 1
        position += rl.prompts_per_step

        record = _metrics(runtime, step, stage.name, [results[(s, i)] for s in mine for i in range(rl.group_size)],
                          len(reused), counts, sampler.stats, stats_before, switch,
                          rollout_seconds, training_seconds, time.perf_counter() - started, train_stats,
                          scheduler.get_last_lr()[0])
        if runtime.is_main:
            log.write(record)
            plot = plot_grpo(log.records(), run_dir / "grpo.png")
            failed = record["infrastructure_failures"]
            print(f"step {step}/{t.steps} [{stage.name}] reward {record['reward_mean']:+.3f} "
                  f"resolved {record.get('resolve_rate', math.nan):.2f} loop {record.get('loop_rate', math.nan):.2f} "
                  f"loss {record['loss']:+.4f} ({record['step_seconds']:.0f} s)"
                  + (f", {failed} infrastructure failure(s) left out" if failed else ""), flush=True)
        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == t.steps:
            state = {"task_position": position, "scheduler": scheduler.state_dict(), "stage": stage.name,
                     "phase": "grpo", "base_model": base}
            save_training_checkpoint(run_dir, step, state, root, model, optimizer, runtime,
                                     cfg.checkpoint.keep_last, cfg.checkpoint.max_shard_size, cfg.checkpoint.dtype)
        summary = record
    if trace is not None:
        trace.close()
    if runtime.is_main:
        final = latest_checkpoint(run_dir)
        summary = {**summary, "checkpoint": str(final / "model") if final else None,
                   "metrics": str(run_dir / "metrics.jsonl"), "plot": str(plot) if plot else None}
        print(f"GRPO done\n  checkpoint: {summary['checkpoint']}\n  metrics:    {summary['metrics']}\n"
              f"  plots:      {summary['plot']}", flush=True)
    return summary


# ---------------------------------------------------------------------------------------------- set-up

def _load_tasks(path: str) -> list:
    source = path or str(BUNDLED_JSONL)
    try:
        tasks = load_tasks(source)
    except (TaskFormatError, OSError, ValueError) as e:
        raise ConfigError(f"config: rl.tasks = {source!r}: {e}") from None
    if not tasks:
        raise ConfigError(f"config: rl.tasks = {source!r} holds no usable task")
    return tasks


def _tiny_base(directory: Path, seed: int, runtime: Runtime) -> Path:
    """model.path empty: a tiny random Qwen2 and its tokenizer, made once by rank 0 (kept for resumes)."""
    if runtime.is_main and not (directory / "config.json").is_file():
        tmp = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        make_tiny_base(tmp, seed)
        os.replace(tmp, directory)
    barrier(runtime)
    return directory


def _reference(cfg: TrainConfig, base: str, config: ModelConfig, dtype: torch.dtype, runtime: Runtime):
    """The frozen reference (the SFT checkpoint), in the compute dtype, sharded like the policy, and fully
    resharded after each forward (it has no backward to gather for: nothing of it stays gathered)."""
    path = cfg.rl.reference or base
    try:
        ref_config = ModelConfig.from_json(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"config: rl.reference = {path!r}: {e}") from None
    mismatch = [f"{k} {getattr(ref_config, k)} vs {getattr(config, k)}" for k in
                ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "tie_word_embeddings") if getattr(ref_config, k) != getattr(config, k)]
    if mismatch:
        raise ConfigError(f"config: rl.reference = {path!r} has other shapes than the policy: {', '.join(mismatch)}")
    model, root = build_training_model(path, dtype, dtype, runtime, False, TokenLogprobs, cfg.rl.reference_offload)
    model.exact = cfg.model.exact
    for p in root.parameters():
        p.requires_grad_(False)
    reshard_after_every_forward(root)
    return root


def _expert(rl):
    if rl.expert == "oracle":
        from protege.rollout.agent.oracle import OracleExpert
        return OracleExpert()
    if rl.expert == "anthropic":
        from protege.rollout.agent.client import AnthropicClient
        from protege.rollout.agent.expert import AnthropicExpert
        return AnthropicExpert(AnthropicClient(rl.expert_model))
    return NoExpert()


IDENTITY = "identity.json"   # in rollouts/: what the stored rollouts are rollouts of


def run_identity(cfg: TrainConfig, base: str, stages) -> dict:
    """What a stored rollout depends on, so that only the same run reuses it: the task file's content, the
    starting model (its path, config.json and weight files' sizes: hashing the weights would take minutes),
    tokenizer, seed, sampling, agent and reward settings, and how tasks form groups."""
    rl, base_dir = cfg.rl, Path(base).resolve()
    tasks = Path(rl.tasks or BUNDLED_JSONL)
    weights = {p.name: p.stat().st_size for p in sorted(base_dir.glob("*.safetensors"))}
    return {"tasks": {"sha256": hashlib.sha256(tasks.read_bytes()).hexdigest()},   # the content, wherever it is
            "model": {"path": str(base_dir), "config_sha256": hashlib.sha256((base_dir / "config.json").read_bytes())
                      .hexdigest(), "weight_bytes": weights, "dtype": cfg.model.dtype,
                      "compute_dtype": cfg.model.compute_dtype, "exact": cfg.model.exact},
            "tokenizer": str(Path(cfg.data.tokenizer or base).resolve()), "seed": cfg.seed,
            "sampling": {"temperature": rl.temperature, "top_p": rl.top_p, "max_turn_tokens": rl.max_turn_tokens},
            "agent": {k: getattr(rl, k) for k in ("max_steps", "max_context_tokens", "max_seconds", "command_timeout_s",
                                                  "expert", "expert_model", "expert_quota", "expert_budget_usd")},
            "reward": {"stages": list(rl.stages), "configs": [asdict(s.reward) for s in stages.stages]},
            "groups": {"prompts_per_step": rl.prompts_per_step, "group_size": rl.group_size}}


def _stored_rollout_files(run_dir: Path) -> list[str]:
    """The non-empty rollouts/step_N.jsonl files an earlier run left in run_dir."""
    return sorted(p.name for p in (run_dir / "rollouts").glob("step_*.jsonl") if p.stat().st_size)


def _refuse_fresh_start_over_rollouts(run_dir: Path, resume: bool) -> None:
    stored = _stored_rollout_files(run_dir)
    if stored and not resume:
        raise ConfigError(f"{run_dir / 'rollouts'} holds another run's stored rollouts ({', '.join(stored[:3])}"
                          f"{' ...' if len(stored) > 3 else ''}): pass --resume to continue that run, or choose "
                          f"another output_dir (nothing was deleted)")


def _check_stored_identity(run_dir: Path, identity: dict) -> None:
    """--resume: stored rollouts are reused only when the run is the one that stored them."""
    stored = _stored_rollout_files(run_dir)
    if not stored:
        return
    path = run_dir / "rollouts" / IDENTITY
    try:
        before = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing, so the stored rollouts ({stored[0]} ...) cannot be checked to "
                          f"be this run's; resume with the version that wrote them, or choose another output_dir"
                          ) from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None

    def flat(d, prefix=""):
        return {k: v for key, value in d.items()
                for k, v in (flat(value, f"{prefix}{key}.").items() if isinstance(value, dict)
                             else [(f"{prefix}{key}", value)])}

    old, new = flat(before), flat(json.loads(json.dumps(identity)))   # as stored: lists, not tuples
    differ = [f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in sorted(set(old) | set(new))
              if old.get(k) != new.get(k)]
    if differ:
        raise ConfigError(f"--resume: {run_dir / 'rollouts'} holds another run's rollouts ({'; '.join(differ)}); "
                          f"resume with the settings that stored them, or choose another output_dir")


def _stored_rollouts(path: Path, step: int, slots: set[int]) -> dict[tuple[int, int], Rollout]:
    """The trajectories of this step already finished by an interrupted run (a torn last line is skipped);
    run_grpo has checked they are this run's (run_identity)."""
    found = {}
    if not path.is_file():
        return found
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step") == step and record["slot"] in slots:
            traj = Trajectory.from_dict(record["trajectory"], where=str(path))
            found[(record["slot"], record["sample"])] = Rollout(record["slot"], record["sample"], record["seed"],
                                                                traj, record["reward"])
    return found


class _StepTrace:
    """log.sampler_trace: this rank's sampler steps (end time since the GRPO step's start, the running batch,
    tokens) and the step's phases, one JSON line each in sampler_trace/rank_R.jsonl. What a schedule model
    is checked against (benchmarks/grpo_sim_validation.py); off by default, it costs a line per step."""

    def __init__(self, run_dir: Path, rank: int, sampler: Sampler):
        (run_dir / "sampler_trace").mkdir(parents=True, exist_ok=True)
        self.file = open(run_dir / "sampler_trace" / f"rank_{rank}.jsonl", "a", encoding="utf-8", buffering=1)
        self.step, self.origin = 0, 0.0
        sampler.on_step = self._sampler_step

    def begin(self, step: int, origin: float) -> None:
        self.step, self.origin = step, origin

    def _write(self, record: dict) -> None:
        self.file.write(json.dumps({"step": self.step, **record}) + "\n")   # line-buffered: one write a line

    def _sampler_step(self, r) -> None:
        self._write({"t": r.end - self.origin, "seconds": r.seconds, "sequences": r.sequences,
                     "decode_rows": r.decode_rows, "tokens": r.tokens, "context": r.context})

    def phase(self, name: str, start: float, end: float) -> None:
        self._write({"phase": name, "start": start - self.origin, "end": end - self.origin})

    def close(self) -> None:
        self.file.close()


# ---------------------------------------------------------------------------------------------- update

def _training_samples(groups: list[list[Rollout]], rl) -> tuple[list[Sample], Counter]:
    """Each task's group as training samples, and counts of what was left out. A trajectory the infrastructure
    failed (Trajectory.infrastructure_error) is no sample of the policy: never trained on, never in its group's
    mean and std; a group left with fewer than 2 valid trajectories is dropped. The policy's own failures (bad
    calls, loops, its command's timeout, running out of steps) stay in."""
    samples: list[Sample] = []
    counts = Counter(zero_variance_groups=0, masked_trajectories=0, infrastructure_failures=0, dropped_groups=0)
    for group in groups:
        valid = torch.tensor([r.trajectory.infrastructure_error is None for r in group])
        counts["infrastructure_failures"] += int((~valid).sum())
        if not bool(usable_groups(valid, len(group))):
            counts["dropped_groups"] += 1
            continue
        totals = torch.tensor([r.reward["R_total"] for r in group], dtype=torch.float64)
        advantages = group_advantages(totals, len(group), valid=valid)
        if bool((totals[valid] == totals[valid][0]).all()):
            counts["zero_variance_groups"] += 1
            if rl.drop_zero_variance:
                continue
        for r, a, ok in zip(group, advantages.tolist(), valid.tolist()):
            if not ok:
                continue
            if rl.mask_truncated and r.trajectory.termination in TRUNCATED:
                counts["masked_trajectories"] += 1
                continue
            sample = _sample(r.trajectory, a)
            if sample.rows:   # e.g. a prompt that left no room for a first turn: no policy token to train
                samples.append(sample)
    return samples, counts


def _sample(traj: Trajectory, advantage: float) -> Sample:
    ids, mask = traj.input_ids(), traj.loss_mask()
    logprobs = [x for m in traj.messages if m.logprobs is not None for x in m.logprobs]
    rows = [i - 1 for i in range(1, len(ids)) if mask[i]]
    if len(logprobs) != len(rows):
        raise ValueError(f"trajectory {traj.task_id}#{traj.attempt}: {len(rows)} policy tokens but "
                         f"{len(logprobs)} sampler log-probs")
    return Sample(ids, rows, [ids[i + 1] for i in rows], logprobs, advantage)


@dataclass
class _Batch:
    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    rows: torch.Tensor
    targets: torch.Tensor
    sampler_logprobs: torch.Tensor
    advantages: torch.Tensor
    samples: list[int]           # indices of its samples in the mini-batch


def _micro_batches(samples: list[Sample], budget: int, device) -> list[_Batch]:
    if not samples:
        return []
    packing = pack([len(s.ids) for s in samples], max(budget, max(len(s.ids) for s in samples)))
    out = []
    for bin_ in packing.bins:
        ids, rows, targets, logps, advs, cu = [], [], [], [], [], [0]
        for i in bin_:
            s = samples[i]
            rows += [cu[-1] + r for r in s.rows]
            ids += s.ids
            targets += s.targets
            logps += s.sampler_logprobs
            advs += [s.advantage] * len(s.rows)
            cu.append(cu[-1] + len(s.ids))
        out.append(_Batch(torch.tensor(ids, device=device), torch.tensor(cu, dtype=torch.int32, device=device),
                          torch.tensor(rows, dtype=torch.int64, device=device), torch.tensor(targets, device=device),
                          torch.tensor(logps, dtype=torch.float32, device=device),
                          torch.tensor(advs, dtype=torch.float32, device=device), list(bin_)))
    return out


def _placeholder(device) -> _Batch:
    # A rank with fewer micro-batches still joins every FSDP collective: one token, no policy row.
    empty = torch.zeros(0, device=device)
    return _Batch(torch.zeros(1, dtype=torch.int64, device=device), torch.tensor([0, 1], dtype=torch.int32,
                  device=device), empty.long(), empty.long(), empty, empty, [])


def _update(cfg: TrainConfig, runtime: Runtime, root, reference, optimizer, scheduler, samples: list[Sample],
            model) -> dict:
    """rl.mini_batches optimizer steps over this rank's samples; every rank runs the same number of passes."""
    rl, t = cfg.rl, cfg.train
    device, world = runtime.device, runtime.world_size
    sums = Counter()
    mismatch_max = 0.0
    use_sampler_old = cfg.model.exact or not rl.recompute_logprobs
    T = rl.temperature   # the sampler's log-probs are of softmax(z / T): the trainer's must be too
    # The old log-probs are the behaviour policy's (the weights that sampled) in every mini-batch: the sampler's
    # own (exact mode: bitwise the trainer's; or recompute_logprobs off), or in fast mode the trainer's, computed
    # ONCE with the rollout weights before the first update -- never from weights an earlier mini-batch moved --
    # with the truncated importance weight correcting for the sampler's numerics.
    passes = []
    for k in range(rl.mini_batches):
        batches = _micro_batches(samples[k::rl.mini_batches], t.micro_batch_tokens, device)
        most, = all_reduce([len(batches)], "max", runtime)
        batches += [_placeholder(device) for _ in range(int(most) - len(batches))]
        tokens, = all_reduce([float(sum(len(b.rows) for b in batches))], "sum", runtime)
        old = []
        if tokens and not use_sampler_old:
            with torch.no_grad():
                old = [root(b.input_ids, b.cu_seqlens, b.rows, b.targets, temperature=T)[0] for b in batches]
        passes.append((batches, tokens, old))
    for k, (batches, tokens, old) in enumerate(passes):
        if tokens == 0:
            continue
        ref = []
        if reference is not None:   # the KL compares the two policies at the temperature sampled with
            with torch.no_grad():
                ref = [reference(b.input_ids, b.cu_seqlens, b.rows, b.targets, temperature=T)[0] for b in batches]
        for j, b in enumerate(batches):
            logp, entropy = root(b.input_ids, b.cu_seqlens, b.rows, b.targets, temperature=T)
            old_j = b.sampler_logprobs if use_sampler_old else old[j]
            weight = torch.ones_like(logp)
            if not use_sampler_old and rl.tis_cap > 0:   # truncated importance sampling on the sampler's draw
                weight = torch.exp(old_j - b.sampler_logprobs).clamp(max=rl.tis_cap)
            loss, stats = policy_loss(logp, old_j, b.advantages, weight, ref[j] if ref else None, rl.kl_coef,
                                      rl.eps_low, rl.eps_high, num_tokens=tokens)
            # FSDP averages gradients over ranks; the loss is a sum over the global batch: undo the average.
            (loss * world).backward()
            n = len(b.rows)
            sums["loss"] += float(loss.detach())
            sums["entropy"] += float(entropy.detach().sum())
            for key in ("clip_frac_low", "clip_frac_high", "ratio_mean", "kl_mean"):
                sums[key] += stats[key] * n
            sums["tokens"] += n
            if k == 0 and n:   # before any update of this step: the trainer's view of the sampled tokens
                diff = (logp.detach() - b.sampler_logprobs).abs()
                sums["logprob_diff_sum"] += float(diff.sum())
                sums["first_tokens"] += n
                mismatch_max = max(mismatch_max, float(diff.max()))
                sums["first_ratio_dev"] = max(sums["first_ratio_dev"],
                                              float((torch.exp(logp.detach() - old_j) - 1).abs().max()))
        grad_norm = torch.nn.utils.clip_grad_norm_(root.parameters(), t.grad_clip if t.grad_clip > 0 else math.inf)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        sums["grad_norm"] = float(grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        model.weight_version += 1
        sums["updates"] += 1
    keys = ["loss", "entropy", "clip_frac_low", "clip_frac_high", "ratio_mean", "kl_mean", "tokens",
            "logprob_diff_sum", "first_tokens"]
    totals = dict(zip(keys, all_reduce([sums[k] for k in keys], "sum", runtime)))
    mismatch_max, first_ratio_dev = all_reduce([mismatch_max, sums["first_ratio_dev"]], "max", runtime)
    n = max(1.0, totals["tokens"])
    return {"loss": totals["loss"] / max(1, sums["updates"]), "entropy": totals["entropy"] / n,
            "clip_frac_low": totals["clip_frac_low"] / n, "clip_frac_high": totals["clip_frac_high"] / n,
            "ratio_mean": totals["ratio_mean"] / n, "kl_mean": totals["kl_mean"] / n,
            "trained_tokens": int(totals["tokens"] / max(1, sums["updates"])) if sums["updates"] else 0,
            "grad_norm": sums["grad_norm"], "updates": sums["updates"],
            "sampler_trainer_logprob_max": mismatch_max,
            "sampler_trainer_logprob_mean": totals["logprob_diff_sum"] / max(1.0, totals["first_tokens"]),
            "first_ratio_max_deviation": first_ratio_dev}


# ---------------------------------------------------------------------------------------------- metrics

def _metrics(runtime: Runtime, step: int, stage: str, mine: list[Rollout], reused: int, counts: Counter,
             stats, stats_before, switch, rollout_seconds: float, training_seconds: float,
             step_seconds: float, train: dict, lr: float) -> dict:
    local = [{"reward": r.reward, "steps": r.trajectory.steps, "termination": r.trajectory.termination,
              "expert_tokens": r.trajectory.expert_tokens, "total_tokens": r.trajectory.total_tokens,
              "policy_tokens": r.trajectory.policy_tokens, "expert_cost": r.trajectory.expert_cost_usd,
              "quota_refusals": sum(c.refused for c in r.trajectory.expert_calls),
              "restarts": len(r.trajectory.infrastructure_restarts),   # runs lost with their host, run again
              "infrastructure": None if r.trajectory.infrastructure_error is None   # its kind, e.g. "sampler"
              else r.trajectory.infrastructure_error.partition(":")[0]} for r in mine]
    counters = [reused, counts["zero_variance_groups"], counts["masked_trajectories"], counts["dropped_groups"],
                stats.generated_tokens - stats_before.generated_tokens,
                stats.cached_tokens - stats_before.cached_tokens,
                stats.prompt_tokens - stats_before.prompt_tokens,
                stats.preemptions - stats_before.preemptions]
    everyone = [local]
    if dist.is_initialized() and runtime.world_size > 1:
        everyone = [None] * runtime.world_size
        dist.all_gather_object(everyone, local)
    everything = [r for part in everyone for r in part]
    rows = [r for r in everything if r["infrastructure"] is None]   # the policy's figures: its own trajectories
    reused, zero_variance, masked, dropped, generated, cached, prompt, preempted = all_reduce(counters, "sum", runtime)
    peak_blocks, = all_reduce([stats.peak_blocks_in_use], "max", runtime)
    breakdowns = [RewardBreakdown(**r["reward"]) for r in rows]
    totals = [b.R_total for b in breakdowns]
    mean = sum(totals) / len(totals) if totals else math.nan
    agg = aggregate(breakdowns, [r["expert_tokens"] for r in rows], [r["total_tokens"] for r in rows])
    failures = Counter(r["infrastructure"] for r in everything if r["infrastructure"] is not None)
    record = {"step": step, "stage": stage, "trajectories": len(everything), "reward_mean": mean,
              "reward_std": (sum((x - mean) ** 2 for x in totals) / max(1, len(totals) - 1)) ** 0.5, **agg,
              "longest_streak": max((max(b.streaks, default=0) for b in breakdowns), default=0),
              "steps_mean": sum(r["steps"] for r in rows) / len(rows) if rows else math.nan,
              "terminations": dict(Counter(r["termination"] for r in everything)),
              "infrastructure_failures": sum(failures.values()), "infrastructure_failure_kinds": dict(failures),
              "infrastructure_restarts": sum(r.get("restarts", 0) for r in everything),
              "dropped_groups": int(dropped),
              "quota_refusals": sum(r["quota_refusals"] for r in rows),
              "expert_cost_usd": sum(r["expert_cost"] for r in everything),
              "reused_trajectories": int(reused), "zero_variance_groups": int(zero_variance),
              "masked_trajectories": int(masked), "generated_tokens": int(generated),
              "rollout_tokens_per_s": generated / max(rollout_seconds, 1e-9),
              "prefix_cache_hit_rate": cached / prompt if prompt else 0.0, "preemptions": int(preempted),
              "kv_peak_blocks": int(peak_blocks), "rollout_seconds": rollout_seconds,
              "training_seconds": training_seconds, "step_seconds": step_seconds,
              "switch_seconds": switch.seconds, "switch_gathered_bytes": switch.gathered_bytes,
              "switch_copied_bytes": switch.copied_bytes, "lr": lr, **train}
    return record


def plot_grpo(records: list[dict], out: Path) -> None:
    """The curves the paper shows: reward and its terms, resolve rate, loop rate, expert use, steps; a PNG at
    `out`, or None (with a note) without matplotlib."""
    plt = pyplot("the GRPO plots")
    if plt is None:
        return None

    steps = [r["step"] for r in records]
    panels = [("reward", ["reward_mean", "mean_R_loop", "mean_R_follow", "mean_R_correct", "mean_R_expert"]),
              ("resolve rate", ["resolve_rate"]), ("loop rate (streak > 10)", ["loop_rate"]),
              ("expert", ["expert_calls_per_traj", "expert_token_share"]), ("steps per trajectory", ["steps_mean"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), dpi=110)
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            ax.plot(steps, [r.get(key, float("nan")) for r in records], marker=".", label=key)
        ax.set_title(title)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
