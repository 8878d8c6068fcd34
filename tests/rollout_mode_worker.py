"""One rank of the rollout-mode test (tests/test_rollout_mode.py), run under torchrun with gloo on the CPU:
the engine's FSDP2 model samples its share of the prompts in rollout mode, takes an optimizer step, samples
again, and writes what it saw to OUT/rank_R.json."""
import json
import os
import sys
from pathlib import Path

import torch

from protege.engine.training.parallelize import RolloutMode, build_training_model
from protege.engine.training.runtime import init_runtime
from protege.engine.training.sft import TokenNLL
from protege.rollout.sampler import Sampler, SamplingParams
from rollout_mode_case import PROMPTS, GREEDY_TOKENS, train_batch, LR


def main(checkpoint: str, out: str) -> None:
    runtime = init_runtime("cpu")
    assert runtime.sharded and runtime.world_size == 2
    model, root = build_training_model(checkpoint, torch.float32, torch.float32, runtime, False, TokenNLL)
    sampler = Sampler(model, num_blocks=64, block_size=4)
    rollout = RolloutMode(root, model, sampler)
    mine = PROMPTS[runtime.rank::runtime.world_size]
    params = SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS, ignore_eos=True)
    report = {"rank": runtime.rank}
    try:
        sampler.generate(mine, params)
        report["sharded_error"] = None
    except RuntimeError as e:
        report["sharded_error"] = str(e)

    with rollout:
        weights = {name: (type(p).__name__, p.dtype == torch.float32, p.data_ptr()) for name, p in
                   model.named_parameters()}
        report["plain_full_params"] = all(kind in ("Parameter", "Tensor") for kind, _, _ in weights.values())
        before = [c.token_ids for c in sampler.generate(mine, params)]
        first = sampler.generate(mine, params)
        report["cached_within_rollout"] = sampler.stats.cached_tokens
        report["same_storage_after_sampling"] = all(
            p.data_ptr() == weights[name][2] for name, p in model.named_parameters())
    report["switch_1"] = vars(rollout.last_switch) | {"seconds": rollout.last_switch.seconds}
    report["first"] = [[c.token_ids, c.logprobs] for c in first]
    report["repeat_equal"] = before == [c.token_ids for c in first]

    optimizer = torch.optim.AdamW(root.parameters(), lr=LR)
    ids, cu, targets, weights_ = train_batch()
    (root(ids, cu, targets, weights_) / weights_.sum()).backward()
    optimizer.step()

    with rollout:
        cached = sampler.stats.cached_tokens
        second = sampler.generate(mine, params)
        report["cached_after_step"] = sampler.stats.cached_tokens - cached
    report["second"] = [[c.token_ids, c.logprobs] for c in second]
    Path(out, f"rank_{runtime.rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    sys.stdout.flush()
    os._exit(0)   # gloo workers occasionally abort in interpreter teardown
