"""Rollouts: sampler, agent loop, environments, experts, trajectories."""

from rollout.sampler import Sampler
from rollout.sampling import SamplingParams

__all__ = ["Sampler", "SamplingParams"]
