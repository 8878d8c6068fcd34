"""Rollouts: sampler, agent loop, environments, experts, trajectories."""
