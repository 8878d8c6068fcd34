"""Phase 2 end to end on the CPU: `engine/train.py --config configs/grpo-tiny.toml` (bundled tasks, bubblewrap
sandbox, oracle expert, in-process sampler in rollout mode) on one rank and under torchrun on two, kill -9
mid-rollout then --resume, and the configuration errors.

The policy is the tiny random base briefly taught (teach_to_loop, a few seconds) to answer most turns (about 9
in 10) with an empty message (an invalid action: "no tool call"), else with <|endoftext|>, which ends the
trajectory ("eos"). So a trajectory loops on the same invalid action for a random number of turns, and
the method's loop term (R_loop: streaks past k1 = 15, with rl.max_steps = 18; and its gate g_loop) gives the
members of a group different rewards: nonzero advantages. rl.mini_batches = 2 makes the second optimizer step
of every RL step see a ratio that is not 1 (and some tokens clipped), so the rank and resume comparisons
cover the advantages, the clip and the importance ratio, not only the KL term (against a different random
reference model, so that an update whose groups all have equal rewards is not zero either)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from protege.engine.tokenizer import Tokenizer
from protege.engine.training.tiny import make_tiny_base

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "grpo-tiny.toml"
TRAIN = [sys.executable, str(REPO / "engine" / "train.py"), "--config", str(CONFIG)]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(REPO / "engine" / "train.py"), "--config", str(CONFIG)]
METRICS = ("reward_mean", "reward_std", "mean_R_loop", "mean_R_follow", "mean_R_correct", "mean_R_sim",
           "mean_R_expert", "mean_g_loop", "resolve_rate", "loop_rate", "longest_streak", "expert_calls_per_traj",
           "expert_token_share", "back_to_back_per_traj", "quota_refusals", "expert_cost_usd", "steps_mean",
           "terminations", "generated_tokens", "rollout_tokens_per_s", "rollout_seconds", "training_seconds",
           "switch_seconds", "switch_copied_bytes", "kv_peak_blocks", "preemptions", "prefix_cache_hit_rate",
           "clip_frac_low", "clip_frac_high", "ratio_mean", "kl_mean", "entropy", "grad_norm", "lr",
           "sampler_trainer_logprob_max", "sampler_trainer_logprob_mean", "zero_variance_groups", "stage")


def teach_to_loop(model_dir: Path, stay: float = 0.95, turns: int = 17, steps: int = 20) -> None:
    """A brief SFT of the checkpoint in model_dir, in place: at the start of each assistant turn of a
    conversation of empty turns (each answered with the agent loop's "no tool call" observation), the target
    is <|im_end|> (an empty turn) with probability `stay`, else <|endoftext|> (the run ends)."""
    from protege.engine.chat import Conversation
    from protege.engine.model import Qwen2ForCausalLM
    from protege.rollout.agent.loop import SYSTEM_PROMPT, TASK_PROMPT
    from protege.rollout.agent.tools import TOOLS
    from protege.rollout.envs.sandbox import SandboxEnvironment
    from protege.rollout.tasks import bundled_tasks
    tokenizer = Tokenizer.from_dir(model_dir)
    model = Qwen2ForCausalLM.from_pretrained(model_dir)
    chat = Conversation(tokenizer, TOOLS)   # as the agent loop renders it
    chat.append({"role": "system", "content": SYSTEM_PROMPT})
    chat.append({"role": "user", "content": TASK_PROMPT.format(problem=bundled_tasks()[0].problem_statement,
                                                               repo_dir=SandboxEnvironment.repo_dir)})
    rows = []   # the positions whose next token is a turn's first
    for _ in range(turns):
        rows.append(len(chat.ids) + len(chat.generation_prompt) - 1)
        chat.append({"role": "assistant", "content": ""})
        # the observation the agent loop gives a turn without a tool call
        chat.append({"role": "tool", "content": "Call exactly one tool per turn; your message had no tool call."})
    ids = torch.tensor(chat.ids)
    cu_seqlens = torch.tensor([0, len(ids)], dtype=torch.int32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        hidden = model(ids, cu_seqlens, return_hidden=True)[rows]
        logp = torch.log_softmax(hidden @ model.lm_head_weight.T, dim=-1)
        loss = -(stay * logp[:, tokenizer.im_end_id] + (1 - stay) * logp[:, tokenizer.endoftext_id]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(model_dir)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("grpo_base")
    make_tiny_base(base, seed=0)
    teach_to_loop(base)
    reference = tmp_path_factory.mktemp("grpo_ref")
    make_tiny_base(reference, seed=1, tokenizer=Tokenizer.from_dir(base))
    return base, reference


def overrides(models, out: Path, *extra: str) -> list[str]:
    base, reference = models
    return [f"output_dir={json.dumps(str(out))}", f"model.path={json.dumps(str(base))}",
            f"rl.reference={json.dumps(str(reference))}", "rl.kl_coef=0.05",
            # Past k1 = 15 repeats the loop term counts: rewards differ within a group (module docstring).
            # Groups of 4 on 2 ranks: each rank's mini-batches hold the same samples as one rank's.
            "rl.max_steps=18", "rl.group_size=4", "rl.mini_batches=2", "log.sampler_trace=true", *extra]


def run(cmd, **env):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def rollouts(out: Path, step: int) -> dict:
    lines = (out / "rollouts" / f"step_{step}.jsonl").read_text().splitlines()
    return {(r["slot"], r["sample"]): r for r in map(json.loads, lines)}


def final_weights(out: Path) -> dict:
    ckpt = sorted((out / "checkpoints").glob("step_*"))[-1]
    return load_file(str(ckpt / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def one_rank(models, tmp_path_factory, sandbox_ready):
    out = tmp_path_factory.mktemp("grpo_one")
    done = run(TRAIN + overrides(models, out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_three_steps_write_every_metric_rollout_and_checkpoint(one_rank):
    records = metrics(one_rank)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["stage"] for r in records] == ["I", "I", "II"]          # rl.stages = ["1-2", "3-160"]
    for r in records:
        missing = [k for k in METRICS if k not in r]
        assert not missing, missing
        assert r["trajectories"] == 8 and r["switch_copied_bytes"] == 0
        assert r["loss"] != 0.0 and r["kl_mean"] >= 0.0
    # Exact mode on the PyTorch path: the trainer's log-probs of the sampled tokens equal the sampler's to
    # 1e-5, so the first update's ratio is 1 (bitwise on the Triton path: tests/test_sampler.py).
    assert all(r["sampler_trainer_logprob_max"] <= 1e-5 and r["first_ratio_max_deviation"] <= 1e-5
               for r in records)
    # What the rank and resume comparisons train on: in both Stage I steps a group's trajectories looped for
    # different numbers of turns, so their rewards (R_loop) and advantages differ (measured: 0 and 1 of the 2
    # groups with equal rewards); every step's second mini-batch has a ratio that is not 1; some tokens clip.
    assert [r["zero_variance_groups"] < 2 for r in records[:2]] == [True, True]
    assert any(s["reward"]["R_loop"] < 0 for s in rollouts(one_rank, 1).values())
    assert all(r["updates"] == 2 and r["ratio_mean"] != 1.0 for r in records)
    assert any(r["clip_frac_low"] + r["clip_frac_high"] > 0 for r in records)
    for step in (1, 2, 3):
        stored = rollouts(one_rank, step)
        assert sorted(stored) == [(s, i) for s in (2 * step - 2, 2 * step - 1) for i in range(4)]
        assert {r["reward"]["stage"] for r in stored.values()} == {records[step - 1]["stage"]}
        assert all(r["weight_version"] >= 0 and r["sampling"]["temperature"] == 1.0 for r in stored.values())
    assert (one_rank / "grpo.png").stat().st_size > 0
    # log.sampler_trace: every sampler step inside its step's rollout phase, which comes before the update
    trace = [json.loads(line) for line in (one_rank / "sampler_trace" / "rank_0.jsonl").read_text().splitlines()]
    for step in (1, 2, 3):
        phases = {t["phase"]: t for t in trace if t["step"] == step and "phase" in t}
        steps = [t for t in trace if t["step"] == step and "t" in t]
        assert phases["rollout"]["end"] <= phases["training"]["start"] and steps
        assert all(phases["rollout"]["start"] <= t["t"] <= phases["rollout"]["end"] for t in steps)
        assert all(1 <= t["sequences"] <= 8 and t["tokens"] >= t["sequences"] for t in steps)
    assert (one_rank / "checkpoints" / "step_00000003" / "model" / "model.safetensors").is_file()


def test_two_ranks_give_the_rollouts_and_losses_of_one(models, one_rank, tmp_path):
    out = tmp_path / "two"
    # The reference's shards in CPU memory (FSDP2 CPU offload) here: the same results as kept on the device.
    done = run(TORCHRUN + overrides(models, out, "rl.reference_offload=true"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for step in (1, 2, 3):
        one, two = rollouts(one_rank, step), rollouts(out, step)
        assert sorted(one) == sorted(two)
        for key in one:   # seeds from (run seed, step, task slot, sample): the same rollouts on any rank count
            a, b = one[key]["trajectory"]["messages"], two[key]["trajectory"]["messages"]
            assert [m["token_ids"] for m in a] == [m["token_ids"] for m in b]
            assert one[key]["reward"] == two[key]["reward"]
            # Log-probs of a row computed in another batch (the PyTorch path on the host BLAS): equal to 1e-5.
            pairs = [(x, y) for m, n in zip(a, b) if m["logprobs"] for x, y in zip(m["logprobs"], n["logprobs"])]
            assert pairs and max(abs(x - y) for x, y in pairs) <= 1e-5
    for a, b in zip(metrics(one_rank), metrics(out), strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 and abs(a["kl_mean"] - b["kl_mean"]) <= 1e-5
        assert abs(a["ratio_mean"] - b["ratio_mean"]) <= 1e-5
        assert a["zero_variance_groups"] == b["zero_variance_groups"]


def test_kill_mid_rollout_then_resume_reuses_finished_trajectories(models, one_rank, tmp_path):
    out = tmp_path / "killed"
    died = run(TRAIN + overrides(models, out), PROTEGE_FAULT="die-in-rollout-2")
    assert died.returncode == 137, died.stdout[-2000:] + died.stderr[-2000:]
    assert len(rollouts(out, 2)) >= 1 and [r["step"] for r in metrics(out)] == [1]
    done = run(TRAIN + overrides(models, out) + ["--resume"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3] and records[1]["reused_trajectories"] >= 1
    for a, b in zip(metrics(one_rank), records, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6
    want, got = final_weights(one_rank), final_weights(out)
    assert all(torch.allclose(want[k], got[k], rtol=0, atol=1e-6) for k in want)


def test_a_fresh_start_never_reuses_stored_rollouts(models, tmp_path, capsys):
    """Without --resume, a folder that holds stored rollouts is refused, and nothing in it is deleted."""
    from protege.engine.train import main
    stored = tmp_path / "run" / "rollouts" / "step_1.jsonl"
    stored.parent.mkdir(parents=True)
    stored.write_text('{"step": 1}\n')
    code = main(["--config", str(CONFIG), *overrides(models, tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1 and "holds another run's stored rollouts (step_1.jsonl): pass --resume" in err, err
    assert stored.read_text() == '{"step": 1}\n'


@pytest.mark.parametrize("change, differs", [
    (["seed=1"], "seed: 0 there, 1 now"),
    (["rl.temperature=0.7"], "sampling.temperature: 1.0 there, 0.7 now"),
    (["rl.max_steps=5"], "agent.max_steps: 18 there, 5 now"),
    (['rl.stages=["1-3", "4-160"]'], "reward.stages: ['1-2', '3-160'] there, ['1-3', '4-160'] now"),
    (["TASKS"], "tasks.sha256: "),
    (["MODEL"], "model.path: "),
])
def test_resume_reuses_stored_rollouts_only_of_the_same_run(models, tmp_path, capsys, change, differs):
    """--resume checks the run's identity (task file content, model, sampling, agent and reward settings,
    seed) against the one stored with the rollouts, and names what differs."""
    from protege.engine.train import main
    from protege.engine.training.config import curriculum, load_config
    from protege.engine.training.rl import IDENTITY, _check_stored_identity, run_identity
    from protege.rollout.tasks import BUNDLED_JSONL
    out = tmp_path / "run"
    tasks = tmp_path / "tasks.jsonl"
    lines = BUNDLED_JSONL.read_text().splitlines(keepends=True)
    rows = [json.loads(line) for line in lines]
    for row in rows:   # a task's source directory is relative to its task file
        row["source"] = str((BUNDLED_JSONL.parent / row["source"]).resolve())
    tasks.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first = overrides(models, out, f"rl.tasks={json.dumps(str(tasks))}")
    cfg = load_config(CONFIG, first)
    (out / "rollouts").mkdir(parents=True)
    (out / "rollouts" / IDENTITY).write_text(json.dumps(run_identity(cfg, str(models[0]), curriculum(cfg.rl))))
    (out / "rollouts" / "step_1.jsonl").write_text('{"step": 1}\n')
    _check_stored_identity(out, run_identity(cfg, str(models[0]), curriculum(cfg.rl)))   # the same run: reused
    if change == ["TASKS"]:
        tasks.write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))   # one task fewer, same file name
        change = []
    elif change == ["MODEL"]:
        change = [f"model.path={json.dumps(str(models[1]))}", f"data.tokenizer={json.dumps(str(models[0]))}"]
    code = main(["--config", str(CONFIG), *first, *change, "--resume"])
    err = capsys.readouterr().err
    assert code == 1 and "--resume: " in err and "holds another run's rollouts" in err and differs in err, err
    assert (out / "rollouts" / "step_1.jsonl").read_text() == '{"step": 1}\n'


@pytest.mark.parametrize("extra, problem", [
    (["rl.group_size=1"], "rl.group_size must be >= 2"),
    (['rl.stages=["1-80", "70-160"]'], "rl.stages"),
    (["rl.tasks=EMPTY"], "holds no usable task"),
    (["rl.reference=OTHER"], "rl.reference"),
    (["rl.temperature=0"], "rl.temperature = 0.0: GRPO needs a sampling temperature > 0"),
    (["rl.temperature=-0.5"], "rl.temperature = -0.5: GRPO needs a sampling temperature > 0"),
])
def test_bad_input_is_named(models, tmp_path, capsys, extra, problem):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    other = tmp_path / "other"
    from protege.engine.config import ModelConfig
    from protege.engine.model import Qwen2ForCausalLM
    config = ModelConfig.from_json(models[0])
    Qwen2ForCausalLM(ModelConfig(**{**vars(config), "hidden_size": 64, "head_dim": 16})).save_pretrained(other)
    extra = [e.replace("EMPTY", json.dumps(str(empty))).replace("OTHER", json.dumps(str(other))) for e in extra]
    from protege.engine.train import main
    code = main(["--config", str(CONFIG), *overrides(models, tmp_path / "run"), *extra])
    err = capsys.readouterr().err
    assert code in (1, 2) and problem in err and "Traceback" not in err, err


@pytest.mark.parametrize("exact", [False, True])
def test_every_mini_batchs_ratio_is_relative_to_the_behaviour_policy(monkeypatch, exact):
    """rl.mini_batches = 2: the second mini-batch's old log-probs are those of the weights that sampled (fast
    mode: the trainer's, computed before the first update; exact mode: the sampler's), not of the weights the
    first mini-batch moved; its ratio therefore differs from 1."""
    from protege.engine.training import rl
    from protege.engine.training.rl import TokenLogprobs, _micro_batches
    model = tiny_exact_model()
    model.exact = exact
    samples = sampled(model, 1.0, advantages=(1.0, -1.0))
    with torch.no_grad():   # the behaviour policy's log-probs of the second mini-batch (samples[1::2])
        [second] = _micro_batches(samples[1::2], 64, torch.device("cpu"))
        behaviour, _ = TokenLogprobs(model)(second.input_ids, second.cu_seqlens, second.rows, second.targets,
                                            temperature=1.0)
    seen = []
    real = rl.policy_loss
    monkeypatch.setattr(rl, "policy_loss", lambda logp, old, *a, **kw: seen.append((logp.detach(), old)) or
                        real(logp, old, *a, **kw))
    stats = grpo_update(model, samples, mini_batches=2, recompute_logprobs=True, tis_cap=2.0)
    assert stats["updates"] == 2 and len(seen) == 2
    logp, old = seen[1]
    assert torch.equal(old, behaviour if not exact else second.sampler_logprobs)
    assert not torch.equal(logp, old)   # the first update moved the weights: the ratio is not 1


def test_rl_defaults_are_the_methods():
    """config.py's RL defaults and the 7B config are method.md's: G = 6, clip 0.2 / 0.28, KL coefficient 0.001."""
    from protege.engine.training.config import RLSection, load_config
    for rl in (RLSection(), load_config(REPO / "configs" / "grpo-qwen2.5-coder-7b.toml").rl):
        assert (rl.group_size, rl.eps_low, rl.eps_high, rl.kl_coef) == (6, 0.2, 0.28, 0.001)


def scored(slot: int, sample: int, reward: float, infrastructure_error=None, termination="submitted"):
    """A stored rollout as rl.py holds it: a trajectory with two policy tokens, its real reward breakdown
    (R_total set to `reward`)."""
    from protege.engine.training.rl import Rollout
    from protege.rewards.shaping import RewardConfig, score
    from protege.rollout.agent.trajectory import Message, Trajectory
    traj = Trajectory("task", sample, "sampler", "oracle", termination=termination, resolved=False,
                      infrastructure_error=infrastructure_error,
                      messages=[Message("user", "u", [1, 2, 3], [0, 0, 0]),
                                Message("assistant", "a", [4, 5], [1, 1], [-0.5, -0.25])])
    reward = {**score(traj.reward_input(), RewardConfig(), "I").to_dict(), "R_total": reward}
    return Rollout(slot, sample, 0, traj, reward)


def test_infrastructure_failures_are_never_trained_on_nor_in_a_groups_statistics():
    """Group 0: an environment that never started (-10.5) beside rewards 1, 0, 0.5: the advantages are those of
    (1, 0, 0.5) alone -- mean 0.5, std 0.5 -> (1, -1, 0) -- and the failure is no sample. Group 1: three
    sampler failures leave one valid trajectory: dropped. Group 2: the policy's own failures (an error of its
    own, out of steps) stay in. The step's metrics count both, and its reward figures are the policy's only."""
    from types import SimpleNamespace
    from protege.engine.training.parallelize import SwitchStats
    from protege.engine.training.rl import _metrics, _training_samples
    from protege.engine.training.runtime import Runtime
    from protege.rollout.sampler.sampler import SamplerStats
    env, sampler = "environment start: RuntimeError: no image", "sampler: sampler step failed: device lost"
    groups = [[scored(0, 0, 1.0), scored(0, 1, 0.0), scored(0, 2, -10.5, env), scored(0, 3, 0.5)],
              [scored(1, 0, -0.5, sampler), scored(1, 1, -0.5, sampler), scored(1, 2, 1.0), scored(1, 3, -0.5, sampler)],
              [scored(2, 0, 0.0), scored(2, 1, -10.5, termination="error"), scored(2, 2, 1.0),
               scored(2, 3, 0.0, termination="max_steps")]]
    rl = SimpleNamespace(drop_zero_variance=False, mask_truncated=False)
    samples, counts = _training_samples(groups, rl)
    a = 0.5 / (0.5 + 1e-6)   # deviation 0.5 over std 0.5 (+ eps)
    assert [s.advantage for s in samples[:3]] == pytest.approx([a, -a, 0.0], abs=1e-12)
    assert len(samples) == 3 + 4 and all(s.targets == [4, 5] for s in samples)
    policy_own = torch.tensor([0.0, -10.5, 1.0, 0.0], dtype=torch.float64)
    expected = ((policy_own - policy_own.mean()) / (policy_own.std() + 1e-6)).tolist()
    assert [s.advantage for s in samples[3:]] == pytest.approx(expected)
    assert (counts["infrastructure_failures"], counts["dropped_groups"]) == (4, 1)
    record = _metrics(Runtime(0, 1, torch.device("cpu"), sharded=False), 1, "I", [r for g in groups for r in g], 0,
                      counts, SamplerStats(), SamplerStats(), SwitchStats(), 1.0, 1.0, 1.0, {}, 1e-3)
    assert record["trajectories"] == 12 and record["infrastructure_failures"] == 4 and record["dropped_groups"] == 1
    assert record["infrastructure_failure_kinds"] == {"environment start": 1, "sampler": 3}
    valid = [1.0, 0.0, 0.5, 1.0, 0.0, -10.5, 1.0, 0.0]
    assert record["reward_mean"] == pytest.approx(sum(valid) / 8) and record["terminations"]["submitted"] == 10


def tiny_exact_model():
    from protege.engine.config import ModelConfig
    from protege.engine.model import Qwen2ForCausalLM
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    model.exact = True
    return model


def sampled(model, temperature: float, advantages=(1.0, 1.0)) -> list:
    """Two sequences drawn by the sampler at `temperature`, as GRPO Samples (its log-probs as the old ones)."""
    from protege.engine.training.rl import Sample
    from protege.rollout.sampler import Sampler, SamplingParams
    prompts = [[3, 9, 27, 81 % 96, 5, 7, 11], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]][:len(advantages)]
    outs = Sampler(model, num_blocks=16, block_size=4, max_num_batched_tokens=8).generate(
        prompts, [SamplingParams(temperature=temperature, max_tokens=5, seed=i, ignore_eos=True)
                  for i in range(len(prompts))])
    return [Sample(p + o.token_ids, list(range(len(p) - 1, len(p) + len(o.token_ids) - 1)), o.token_ids,
                   o.logprobs, a) for p, o, a in zip(prompts, outs, advantages)]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_exact_mode_first_ratio_is_exactly_one_on_the_triton_path(monkeypatch, temperature):
    """GRPO's own training path (Sample -> packed micro-batch -> TokenLogprobs root -> policy_loss) on the
    sampler's tokens: in exact mode on the Triton path the trainer's log-probs are the sampler's, bit for bit,
    at the temperature the sampler drew with (its log-probs are of softmax(z / T))."""
    from protege.engine.training.grpo import policy_loss
    from protege.engine.training.rl import TokenLogprobs, _micro_batches
    monkeypatch.setenv("PROTEGE_KERNELS", "triton")
    model = tiny_exact_model()
    samples = sampled(model, temperature)
    [batch] = _micro_batches(samples, 64, torch.device("cpu"))
    logp, _ = TokenLogprobs(model)(batch.input_ids, batch.cu_seqlens, batch.rows, batch.targets,
                                   temperature=temperature)
    assert torch.equal(logp.detach(), batch.sampler_logprobs)
    _, stats = policy_loss(logp, batch.sampler_logprobs, batch.advantages, torch.ones_like(logp))
    assert stats["ratio_mean"] == 1.0 and stats["max_abs_logprob_diff"] == 0.0


def grpo_update(model, samples, **rl):
    """engine/training/rl.py's _update on one CPU process: the real loop over real log-probs, no environment."""
    from protege.engine.training.config import TrainConfig
    from protege.engine.training.rl import TokenLogprobs, _update
    from protege.engine.training.runtime import Runtime
    cfg = TrainConfig(phase="grpo")
    cfg.model.exact = model.exact
    cfg.train.micro_batch_tokens = 64
    for key, value in rl.items():
        setattr(cfg.rl, key, value)
    root = TokenLogprobs(model)
    optimizer = torch.optim.SGD(root.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return _update(cfg, Runtime(0, 1, torch.device("cpu"), sharded=False), root, None, optimizer, scheduler,
                   samples, model)


def test_the_update_takes_log_probs_at_the_sampling_temperature(monkeypatch):
    """Through _update itself: at T = 0.7 in exact mode the trainer's first log-probs are the sampler's bits."""
    monkeypatch.setenv("PROTEGE_KERNELS", "triton")
    model = tiny_exact_model()
    stats = grpo_update(model, sampled(model, 0.7), temperature=0.7)
    assert stats["updates"] == 1 and stats["trained_tokens"] == 10
    assert stats["sampler_trainer_logprob_max"] == 0.0 and stats["first_ratio_max_deviation"] == 0.0


def test_a_crashing_environment_ends_its_trajectory_never_the_run(models, tmp_path, bundled_images, docker_client):
    """Docker backend: one task's environment cannot start (its image lacks the task's base commit). Its
    trajectories end as errors recorded as the infrastructure's (never trained on: the group is dropped and
    counted), the other task's run normally, the step completes, and no container is left behind."""
    from protege.rollout.envs.docker import LABEL
    from protege.rollout.tasks import BUNDLED_JSONL
    rows = [json.loads(line) for line in BUNDLED_JSONL.read_text().splitlines()][:2]
    for row in rows:   # a task's source directory is relative to its task file
        row["source"] = str((BUNDLED_JSONL.parent / row["source"]).resolve())
    del rows[1]["source"]   # an image used as it is (not built here), whose repository lacks the commit
    rows[1]["base_commit"] = "0" * 40
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "crash"
    done = run(TRAIN + overrides(models, out, 'rl.backend="docker"', f"rl.tasks={json.dumps(str(tasks))}",
                                 "train.steps=1", "rl.prompts_per_step=2", "rl.group_size=2"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    stored = list(rollouts(out, 1).values())
    broken = [r for r in stored if r["trajectory"]["task_id"] == rows[1]["instance_id"]]
    fine = [r for r in stored if r["trajectory"]["task_id"] == rows[0]["instance_id"]]
    assert len(broken) == len(fine) == 2
    assert all(r["trajectory"]["termination"] == "error" and "cannot put /testbed at" in r["trajectory"]["error"]
               and r["trajectory"]["infrastructure_error"].startswith("environment start:") for r in broken)
    assert all(r["trajectory"]["termination"] != "error" and r["trajectory"]["infrastructure_error"] is None
               for r in fine)
    [record] = metrics(out)
    assert record["step"] == 1 and record["trajectories"] == 4
    assert (record["infrastructure_failures"], record["dropped_groups"]) == (2, 1)
    left = [c for c in docker_client.containers.list(all=True, filters={"label": LABEL})
            if c.labels[LABEL] != str(os.getpid())]   # the training run's containers (not this test process's)
    assert left == []


def test_a_missing_task_image_refuses_the_run_before_any_trajectory(models, tmp_path, bundled_images, docker_client):
    """Docker backend: a task whose image is on no host (and not buildable here) stops the run at its start,
    naming the image and the task; no model is built and no trajectory runs."""
    from protege.rollout.tasks import BUNDLED_JSONL
    rows = [json.loads(line) for line in BUNDLED_JSONL.read_text().splitlines()][:2]
    rows[0]["source"] = str((BUNDLED_JSONL.parent / rows[0]["source"]).resolve())
    del rows[1]["source"]
    rows[1]["image"] = "protege/no-such-image:latest"
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "refused"
    done = run(TRAIN + overrides(models, out, 'rl.backend="docker"', f"rl.tasks={json.dumps(str(tasks))}",
                                 "train.steps=1", "rl.prompts_per_step=2", "rl.group_size=2"))
    assert done.returncode != 0
    assert "protege/no-such-image:latest" in done.stderr and rows[1]["instance_id"] in done.stderr, done.stderr[-3000:]
    assert "1 task image(s) missing" in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert not (out / "rollouts").exists() or not list((out / "rollouts").glob("step_*.jsonl"))
