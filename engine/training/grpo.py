"""The GRPO math as pure functions over tensors: group advantages and the clipped token-level policy loss
(asymmetric clip, DAPO token-level aggregation, k3 KL to a reference). The loop is engine/training/rl.py."""
from __future__ import annotations

import math

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6,
                     valid: torch.Tensor | None = None) -> torch.Tensor:
    """A = (R - mean_G) / (std_G + eps) per group of `group_size` consecutive rewards, mean and std (unbiased,
    as torch.std) over the group's valid members only (`valid`, default all; an invalid reward, whatever its
    value, never enters them). A = 0 for invalid members, for every member of a group with fewer than 2 valid
    ones (see usable_groups) and of a group whose valid rewards are all equal."""
    if group_size < 2:
        raise ValueError(f"group_advantages: group_size must be >= 2 (std of one reward is undefined), "
                         f"got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"group_advantages: {tuple(rewards.shape)} rewards do not split into groups of {group_size}")
    if valid is None:
        valid = torch.ones_like(rewards, dtype=torch.bool)
    if valid.shape != rewards.shape or valid.dtype != torch.bool:
        raise ValueError(f"group_advantages: valid must be a bool mask of the rewards' shape {tuple(rewards.shape)}, "
                         f"got {valid.dtype} {tuple(valid.shape)}")
    mask = valid.view(-1, group_size)
    groups = torch.where(mask, rewards.double().view(-1, group_size), 0.0)
    count = mask.sum(dim=1, keepdim=True).double()
    mean = groups.sum(dim=1, keepdim=True) / count.clamp(min=1)
    squares = torch.where(mask, (groups - mean) ** 2, 0.0).sum(dim=1, keepdim=True)
    std = (squares / (count - 1).clamp(min=1)).sqrt()
    advantages = (groups - mean) / (std + eps)
    # Equal rewards give exactly 0 (their rounded mean may differ from them by an ulp).
    highest = groups.masked_fill(~mask, -math.inf).amax(dim=1, keepdim=True)
    lowest = groups.masked_fill(~mask, math.inf).amin(dim=1, keepdim=True)
    keep = mask & (count >= 2) & (highest > lowest)
    return torch.where(keep, advantages, 0.0).view(-1).to(rewards.dtype)


def usable_groups(valid: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per group of `group_size` consecutive members: has it the 2 valid members a group advantage needs?"""
    return valid.view(-1, group_size).sum(dim=1) >= 2


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0,
                eps_low: float = 0.2, eps_high: float = 0.28, num_tokens: float | None = None
                ) -> tuple[torch.Tensor, dict]:
    """Token-level clipped surrogate: r = exp(logprobs - old_logprobs), surrogate = min(r A, clip(r, 1 - eps_low,
    1 + eps_high) A), per-token loss = -surrogate + kl_coef * (exp(ref - logprobs) - (ref - logprobs) - 1);
    loss = sum(mask * per-token loss) / num_tokens (default: mask.sum(); pass the global batch's count).
    All tensors are per token, of one shape. Stats: clip fractions (low, high), mean ratio, mean KL, max
    |logprobs - old_logprobs|, over masked tokens."""
    mask = mask.to(logprobs.dtype)
    count = mask.sum()
    denominator = count if num_tokens is None else torch.as_tensor(num_tokens, dtype=logprobs.dtype)
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    surrogate = torch.minimum(ratio * advantages, clipped * advantages)
    per_token = -surrogate
    kl = torch.zeros_like(logprobs)
    if ref_logprobs is not None:
        delta = ref_logprobs - logprobs
        kl = delta.exp() - delta - 1.0
        per_token = per_token + kl_coef * kl
    loss = (mask * per_token).sum() / denominator
    with torch.no_grad():
        n = count.clamp(min=1)
        # A token is clipped when the clipped term is the one min() picked and it differs from r A.
        low = (ratio < 1.0 - eps_low) & (advantages < 0)
        high = (ratio > 1.0 + eps_high) & (advantages > 0)
        stats = {
            "clip_frac_low": float((mask * low).sum() / n),
            "clip_frac_high": float((mask * high).sum() / n),
            "ratio_mean": float((mask * ratio).sum() / n),
            "kl_mean": float((mask * kl).sum() / n),
            "max_abs_logprob_diff": float((mask * log_ratio.abs()).max()) if count > 0 else 0.0,
            "tokens": float(count),
        }
    return loss, stats
