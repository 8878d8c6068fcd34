"""One rank of tests/test_rollout_mode.py's phase-switch checks, run under torchrun (2 ranks, gloo, CPU): the
policy trained as in a GRPO run (fp32 masters, bf16 compute, activation checkpointing) samples in rollout mode
with no checkpoint call and no FSDP2 hook, then trains exactly as a model that never switched. Writes what it
saw to OUT/rank_R.json. Then the frozen reference model's forward, after which nothing of it stays gathered."""
import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
from torch.distributed.tensor import DTensor

import protege.engine.training.parallelize as parallelize
from protege.engine.model import Qwen2ForCausalLM
from protege.engine.training.config import TrainConfig
from protege.engine.training.parallelize import RolloutMode, build_training_model, gathered_bytes
from protege.engine.training.rl import _reference
from protege.engine.training.runtime import init_runtime
from protege.engine.training.sft import TokenNLL
from protege.rollout.sampler import Sampler, SamplingParams
from rollout_mode_case import GREEDY_TOKENS, PROMPTS, train_batch

CALLS = Counter()   # checkpoint calls and FSDP2 forward-hook entries, as they happen


def count(owner, name):
    """Route owner.name through a counter (installed before the model is built: hooks bind it then)."""
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        CALLS[name] += 1
        return original(*args, **kwargs)
    setattr(owner, name, counted)


def build(checkpoint, runtime):
    return build_training_model(checkpoint, torch.float32, torch.bfloat16, runtime, True, TokenNLL)


def loss_and_grads(root):
    """One forward and backward of the shared batch: the loss, this rank's gradient shards, the calls made."""
    before = Counter(CALLS)
    ids, cu, targets, weights = train_batch()
    loss = root(ids, cu, targets, weights) / weights.sum()
    loss.backward()
    grads = {name: p.grad.to_local().clone() for name, p in root.named_parameters()}
    root.zero_grad(set_to_none=True)
    return loss.detach(), grads, dict(CALLS - before)


def same(a, b):
    (loss_a, grads_a, _), (loss_b, grads_b, _) = a, b
    return torch.equal(loss_a, loss_b) and grads_a.keys() == grads_b.keys() and all(
        torch.equal(grads_a[k], grads_b[k]) for k in grads_a)


def main(checkpoint: str, out: str) -> None:
    count(parallelize, "checkpoint")
    count(FSDPState, "_pre_forward")
    count(FSDPState, "_post_forward")
    runtime = init_runtime("cpu")
    report = {"rank": runtime.rank}
    mine = PROMPTS[runtime.rank::runtime.world_size]
    params = SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS, ignore_eos=True)

    # A model that never switches: what training computes.
    _, never_root = build(checkpoint, runtime)
    unswitched = loss_and_grads(never_root)
    report["training_calls"] = unswitched[2]

    # The same weights, switched to rollout first (as a GRPO run starts), then trained, twice.
    model, root = build(checkpoint, runtime)
    sampler = Sampler(model, num_blocks=64, block_size=4)
    rollout = RolloutMode(root, model, sampler)
    plain = Sampler(Qwen2ForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16), num_blocks=64, block_size=4)
    expected = [(c.token_ids, c.logprobs) for c in plain.generate(mine, params)]
    report["sampling_calls"], report["same_as_plain_bf16"], report["same_training"] = [], [], []
    for _ in range(2):
        with rollout:
            before = Counter(CALLS)
            got = [(c.token_ids, c.logprobs) for c in sampler.generate(mine, params)]
            report["sampling_calls"].append(dict(CALLS - before))
            report["same_as_plain_bf16"].append(got == expected)
            report["sampler_dtype"] = str(sampler.dtype)
        report["sharded_again"] = all(isinstance(p, DTensor) for p in root.parameters())
        trained = loss_and_grads(root)
        report["same_training"].append(same(trained, unswitched))
        report["training_calls_after"] = trained[2]

    # The frozen reference of a GRPO run (kl_coef > 0): nothing of it stays gathered after a forward.
    ids, cu, targets, _ = train_batch()
    rows = torch.arange(len(ids))
    reference = _reference(TrainConfig(), checkpoint, model.config, torch.bfloat16, runtime)
    with torch.no_grad():
        first = reference(ids, cu, rows, targets, temperature=1.0)[0]
        report["reference_gathered"] = gathered_bytes(reference)
        report["reference_repeat_equal"] = torch.equal(first, reference(ids, cu, rows, targets, temperature=1.0)[0])
        root(ids, cu, targets, torch.ones(len(ids)))
        report["policy_gathered"] = gathered_bytes(root)   # training keeps the root and last layer gathered
    Path(out, f"rank_{runtime.rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    sys.stdout.flush()
    os._exit(0)   # gloo workers occasionally abort in interpreter teardown
