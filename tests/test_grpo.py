"""The GRPO math (engine/training/grpo.py) against values worked out by hand, and its gradient against
torch.autograd on the reference formula written out here independently."""
import math

import pytest
import torch

from protege.engine.training.grpo import group_advantages, policy_loss, usable_groups


def test_group_advantages_by_hand():
    # group [1, 2, 3]: mean 2, unbiased std 1 -> (-1, 0, 1); group [5, 5, 5]: std 0 -> all 0;
    # group [0, 4, 0]: mean 4/3, unbiased std sqrt(((4/3)^2 * 2 + (8/3)^2) / 2) = 2.3094
    a = group_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.0, 4.0, 0.0]), 3, eps=0.0)
    std = math.sqrt(((4 / 3) ** 2 * 2 + (8 / 3) ** 2) / 2)
    expected = [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0, -(4 / 3) / std, (8 / 3) / std, -(4 / 3) / std]
    assert a.tolist() == pytest.approx(expected, abs=1e-6)
    assert group_advantages(torch.tensor([0.0, 1.0]), 2).tolist() == pytest.approx(
        [-0.5 / (math.sqrt(0.5) + 1e-6), 0.5 / (math.sqrt(0.5) + 1e-6)])


def test_group_advantages_over_the_valid_members_by_hand():
    # a: [1, 2, 3 | -10.5 invalid]: mean 2, unbiased std 1 over the valid three -> (-1, 0, 1), the invalid 0.
    # b: [0 | nan | 4 | -0.5], 0 and 4 valid: mean 2, std sqrt((4 + 4) / 1) -> (-2/sqrt(8), 0, 2/sqrt(8), 0);
    #    the nan never reaches a mean. c: valid rewards all 7 -> all 0. d: one valid member -> all 0, not usable.
    T, F = True, False
    rewards = torch.tensor([1.0, 2.0, 3.0, -10.5, 0.0, math.nan, 4.0, -0.5, 7.0, 7.0, -10.5, 7.0, 5.0, -0.5, -0.5, -0.5],
                           dtype=torch.float64)
    valid = torch.tensor([T, T, T, F, T, F, T, F, T, T, F, T, T, F, F, F])
    a = group_advantages(rewards, 4, eps=0.0, valid=valid)
    s8 = math.sqrt(8)
    expected = [-1.0, 0.0, 1.0, 0.0, -2 / s8, 0.0, 2 / s8, 0.0] + [0.0] * 8
    assert a.tolist() == pytest.approx(expected, abs=1e-12)
    assert usable_groups(valid, 4).tolist() == [True, True, True, False]
    # Every member valid: the plain group advantage.
    assert torch.equal(group_advantages(rewards[:3], 3, valid=torch.ones(3, dtype=torch.bool)),
                       group_advantages(rewards[:3], 3))
    with pytest.raises(ValueError, match="valid must be a bool mask"):
        group_advantages(rewards, 4, valid=valid.float())


def test_group_advantages_refuses_bad_groups():
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        group_advantages(torch.zeros(4), 3)


def test_policy_loss_by_hand():
    # Five tokens: ratios e^0 = 1, e^0.5 = 1.6487 (A > 0: clipped high at 1.28), e^-0.5 = 0.6065 (A < 0: clipped
    # low at 0.8), e^0.1 = 1.1052 (A < 0: inside), and a masked token that must not count.
    old = torch.zeros(5)
    new = torch.tensor([0.0, 0.5, -0.5, 0.1, 3.0])
    adv = torch.tensor([2.0, 1.0, -1.0, -3.0, 100.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    loss, stats = policy_loss(new, old, adv, mask)
    surrogate = [1.0 * 2.0, min(math.exp(0.5) * 1.0, 1.28 * 1.0), min(math.exp(-0.5) * -1.0, 0.8 * -1.0),
                 min(math.exp(0.1) * -3.0, math.exp(0.1) * -3.0)]
    assert float(loss) == pytest.approx(-sum(surrogate) / 4, rel=1e-6)
    assert stats["clip_frac_high"] == 0.25 and stats["clip_frac_low"] == 0.25
    assert stats["ratio_mean"] == pytest.approx((1 + math.exp(0.5) + math.exp(-0.5) + math.exp(0.1)) / 4, rel=1e-6)
    assert stats["max_abs_logprob_diff"] == pytest.approx(0.5) and stats["tokens"] == 4
    # num_tokens: the global batch's count, not this micro-batch's
    loss_global, _ = policy_loss(new, old, adv, mask, num_tokens=8)
    assert float(loss_global) == pytest.approx(float(loss) / 2, rel=1e-6)


def test_policy_loss_kl_term_by_hand():
    new, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    loss, stats = policy_loss(new, new.detach(), torch.zeros(2), torch.ones(2), ref_logprobs=ref, kl_coef=0.1)
    kl = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]
    assert float(loss) == pytest.approx(0.1 * sum(kl) / 2, rel=1e-6)
    assert stats["kl_mean"] == pytest.approx(sum(kl) / 2, rel=1e-6) and stats["ratio_mean"] == 1.0


def test_policy_loss_gradient_equals_autograd_of_the_formula():
    g = torch.Generator().manual_seed(0)
    new = (torch.randn(64, generator=g) * 0.3 - 2).double().requires_grad_()
    old, ref = (new.detach() + torch.randn(64, generator=g).double() * 0.3), new.detach() - 0.2
    adv = torch.randn(64, generator=g).double()
    mask = (torch.rand(64, generator=g) > 0.3).double()
    loss, _ = policy_loss(new, old, adv, mask, ref, kl_coef=0.05, eps_low=0.2, eps_high=0.28, num_tokens=100)
    grad, = torch.autograd.grad(loss, new)

    x = new.detach().clone().requires_grad_()
    per_token = []
    for i in range(64):   # the formula, token by token
        r = torch.exp(x[i] - old[i])
        s = torch.minimum(r * adv[i], torch.clamp(r, 0.8, 1.28) * adv[i])
        d = ref[i] - x[i]
        per_token.append(mask[i] * (-s + 0.05 * (torch.exp(d) - d - 1)))
    expected, = torch.autograd.grad(torch.stack(per_token).sum() / 100, x)
    assert torch.allclose(grad, expected, rtol=1e-12, atol=1e-15)
    assert grad[mask == 0].abs().max() == 0
