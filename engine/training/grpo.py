"""The GRPO math as pure functions over tensors: group advantages and the clipped token-level policy loss
(asymmetric clip, DAPO token-level aggregation, k3 KL to a reference). The loop is engine/training/rl.py."""
from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """A = (R - mean_G) / (std_G + eps) per group of `group_size` consecutive rewards (std unbiased, as
    torch.std); every member of a group whose rewards are all equal gets A = 0."""
    if group_size < 2:
        raise ValueError(f"group_advantages: group_size must be >= 2 (std of one reward is undefined), "
                         f"got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"group_advantages: {tuple(rewards.shape)} rewards do not split into groups of {group_size}")
    groups = rewards.double().view(-1, group_size)
    std = groups.std(dim=1, keepdim=True)
    advantages = (groups - groups.mean(dim=1, keepdim=True)) / (std + eps)
    return torch.where(std == 0, 0.0, advantages).view(-1).to(rewards.dtype)


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
