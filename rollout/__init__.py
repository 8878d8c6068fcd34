"""Rollouts: the in-process sampler (rollout.sampler), the agent (rollout.agent), environments
(rollout.envs), tasks, evaluation and trajectory collection."""

from rollout.sampler import Sampler, SamplingParams

__all__ = ["Sampler", "SamplingParams"]
