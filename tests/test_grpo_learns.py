"""GRPO learns: a tiny random Qwen2 (vocabulary of 32) writes 8 tokens after each of 4 fixed prompts; the reward of
a completion is the fraction of its tokens in a target set of 8 ids (about 1/4 at random initialisation; every
group of the first step has reward variance). Each GRPO step samples G = 8 completions per prompt with the engine's
Sampler (temperature 1), takes group_advantages, and trains on them through rl._update (Sample -> _micro_batches ->
TokenLogprobs -> policy_loss, exact mode with 4 mini-batches: after the first, the ratio to the sampler's log-probs
is off 1 and clipping acts -> AdamW step).

The statistic: the mean reward of M = 256 FRESH completions (seeds never used in training, the same ones before
and after) and its standard error; a change is counted in standard errors of the difference (the two in
quadrature). GRPO must raise the fresh reward by more than 5 of them and by 0.25 absolute. The same function with
the advantages zeroed must stay within 2 (zero advantages give zero gradients: nothing but the advantages may
move the policy), and with their sign flipped must lower it by more than 5 and by 0.1 absolute."""
import math

import pytest
import torch

from protege.engine.config import ModelConfig
from protege.engine.model import Qwen2ForCausalLM
from protege.engine.training.config import TrainConfig
from protege.engine.training.grpo import group_advantages
from protege.engine.training.rl import Sample, TokenLogprobs, _update
from protege.engine.training.runtime import Runtime
from protege.engine.training.sft import lr_lambda
from protege.rollout.sampler import Sampler, SamplingParams

VOCAB = 32
TARGET = frozenset(range(8))          # the reward: share of a completion's tokens in here
PROMPTS = [[9, 20, 13, 31, 17, 25], [12, 30, 11, 27, 14, 22], [26, 10, 29, 15, 21, 18], [19, 23, 16, 28, 24, 8]]
COMPLETION_TOKENS = 8
GROUP = 8                             # G completions per prompt and step
STEPS = 12
FRESH_PER_PROMPT = 64                 # M = 4 * 64 fresh completions per evaluation
FRESH_SEED = 10 ** 6                  # fresh seeds: 10**6 + prompt index; training seeds: 1000 * step + prompt
CPU = Runtime(0, 1, torch.device("cpu"), sharded=False)


def reward(tokens: list[int]) -> float:
    return sum(t in TARGET for t in tokens) / len(tokens)


def sample(sampler: Sampler, seeds: list[int], n: int):
    """n completions of every prompt, prompt i drawn with seed seeds[i]."""
    params = [SamplingParams(temperature=1.0, max_tokens=COMPLETION_TOKENS, seed=s, n=n, ignore_eos=True)
              for s in seeds]
    return sampler.generate(PROMPTS, params)


def fresh_reward(sampler: Sampler) -> tuple[float, float]:
    """Mean reward of M fresh completions and its standard error (sample std / sqrt(M))."""
    groups = sample(sampler, [FRESH_SEED + i for i in range(len(PROMPTS))], FRESH_PER_PROMPT)
    rewards = [reward(c.token_ids) for group in groups for c in group]
    mean = sum(rewards) / len(rewards)
    var = sum((r - mean) ** 2 for r in rewards) / (len(rewards) - 1)
    return mean, math.sqrt(var / len(rewards))


def train(advantage_scale: float) -> dict:
    """STEPS GRPO steps from the same seeded model, the advantages multiplied by advantage_scale (1: GRPO,
    0: zeroed, -1: sign flipped); the fresh reward before and after, how many groups had reward variance at each
    step and the largest share of clipped tokens in a step."""
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    model.exact = True
    cfg = TrainConfig(phase="grpo", device="cpu")
    cfg.model.exact = True                 # old log-probs: the sampler's (the tiny config's mode)
    cfg.train.lr, cfg.train.micro_batch_tokens = 1e-2, 128
    cfg.rl.group_size, cfg.rl.mini_batches = GROUP, 4
    root = TokenLogprobs(model)
    t = cfg.train
    optimizer = torch.optim.AdamW(root.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                                  weight_decay=t.weight_decay)
    total = STEPS * cfg.rl.mini_batches
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, t.warmup_steps, total,
                                                                                 t.min_lr_ratio))
    sampler = Sampler(model, num_blocks=1024, block_size=4)

    before = fresh_reward(sampler)
    varied, clipped = [], 0.0       # per step: groups whose rewards differ
    for step in range(STEPS):
        groups = sample(sampler, [1000 * step + i for i in range(len(PROMPTS))], GROUP)
        samples = []
        varied.append(0)
        for prompt, group in zip(PROMPTS, groups):
            rewards = torch.tensor([reward(c.token_ids) for c in group], dtype=torch.float64)
            varied[-1] += bool(rewards.std() > 0)
            advantages = group_advantages(rewards, GROUP) * advantage_scale
            for c, a in zip(group, advantages.tolist()):
                rows = list(range(len(prompt) - 1, len(prompt) + len(c.token_ids) - 1))
                samples.append(Sample(prompt + c.token_ids, rows, c.token_ids, c.logprobs, a))
        stats = _update(cfg, CPU, root, None, optimizer, scheduler, samples, model)
        clipped = max(clipped, stats["clip_frac_low"] + stats["clip_frac_high"])
    after = fresh_reward(sampler)
    return {"before": before, "after": after, "varied_groups": varied, "max_clip_frac": clipped}


@pytest.fixture(scope="module")
def runs():
    out = {name: train(scale) for name, scale in (("grpo", 1.0), ("zeroed", 0.0), ("flipped", -1.0))}
    print(f"\nfresh reward over {len(PROMPTS) * FRESH_PER_PROMPT} completions (mean +- standard error), "
          f"{STEPS} GRPO steps of {len(PROMPTS)} x {GROUP}:")
    for name, r in out.items():
        (b, sb), (a, sa) = r["before"], r["after"]
        print(f"  {name:8s} before {b:.3f} +- {sb:.3f}   after {a:.3f} +- {sa:.3f}   "
              f"change {a - b:+.3f} ({(a - b) / math.hypot(sb, sa):+.1f} SE)   "
              f"groups with reward variance {sum(r['varied_groups'])}/{STEPS * len(PROMPTS)}, "
              f"most clipped in a step {r['max_clip_frac']:.2f}")
    return out


def change(r) -> tuple[float, float]:
    """after - before, in reward and in standard errors of the difference (the two SEs in quadrature)."""
    (b, sb), (a, sa) = r["before"], r["after"]
    return a - b, (a - b) / math.hypot(sb, sa)


def test_the_runs_compare_like_with_like(runs):
    # One starting policy and one set of fresh seeds; at the first step every group has reward variance (the
    # same samples in every run); clipping acts where the policy moves.
    assert runs["grpo"]["before"] == runs["zeroed"]["before"] == runs["flipped"]["before"]
    assert all(r["varied_groups"][0] == len(PROMPTS) for r in runs.values())
    assert runs["grpo"]["max_clip_frac"] > 0 and runs["flipped"]["max_clip_frac"] > 0


def test_grpo_raises_the_fresh_reward(runs):
    delta, z = change(runs["grpo"])
    assert z > 5 and delta > 0.25, (delta, z)


def test_zeroed_advantages_leave_the_fresh_reward_within_noise(runs):
    delta, z = change(runs["zeroed"])
    assert abs(z) < 2, (delta, z)


def test_flipped_advantages_lower_the_fresh_reward(runs):
    delta, z = change(runs["flipped"])
    assert z < -5 and delta < -0.1, (delta, z)
