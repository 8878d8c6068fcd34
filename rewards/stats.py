"""Aggregate reward breakdowns into the figures the method tracks (logged every RL step)."""
from __future__ import annotations

from protege.rewards.shaping import RewardBreakdown

TERMS = ("R_total", "R_loop", "R_follow", "R_other", "R_correct", "R_sim", "R_expert", "R_warrant", "R_b2b",
         "R_quota", "R_no_call", "g_loop", "g_follow")
LOOP_STREAK = 10  # a trajectory "loops" when some streak of identical normalised actions is longer than this


def loops(streak_lengths: list[int]) -> bool:
    return max(streak_lengths, default=0) > LOOP_STREAK


def aggregate(breakdowns: list[RewardBreakdown], expert_tokens: list[int] | None = None,
              total_tokens: list[int] | None = None) -> dict[str, float]:
    """Mean of every term and gate, loop rate, expert calls per trajectory, back-to-back calls per
    trajectory, follow rate (followed / judged non-terminal calls), resolve rate, and -- given token
    counts per trajectory -- the expert's share of all tokens."""
    n = len(breakdowns)
    if n == 0:
        return {}
    out = {f"mean_{t}": sum(getattr(b, t) for b in breakdowns) / n for t in TERMS}
    out["loop_rate"] = sum(loops(b.streaks) for b in breakdowns) / n
    out["resolve_rate"] = sum(b.R_correct for b in breakdowns) / n
    out["expert_calls_per_traj"] = sum(b.expert_calls for b in breakdowns) / n
    out["back_to_back_per_traj"] = sum(b.back_to_back for b in breakdowns) / n
    judged = sum(b.judged_calls for b in breakdowns)
    out["follow_rate"] = sum(b.followed_calls for b in breakdowns) / judged if judged else 0.0
    if expert_tokens is not None and total_tokens is not None:
        if len(expert_tokens) != n or len(total_tokens) != n:
            raise ValueError(f"aggregate: {n} breakdowns but {len(expert_tokens)} expert and "
                             f"{len(total_tokens)} total token counts")
        total = sum(total_tokens)
        out["expert_token_share"] = sum(expert_tokens) / total if total else 0.0
    return out
