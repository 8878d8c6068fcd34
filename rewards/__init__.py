"""The method's shaped trajectory rewards and the two-stage curriculum (../shared/reference/method.md)."""
from rewards.curriculum import Curriculum, Stage
from rewards.normalize import NAVIGATION, normalize_action, normalize_command, run_lengths, streaks
from rewards.shaping import (Action, ExpertCall, RewardBreakdown, RewardConfig, RewardInput, gate, loop_reward,
                             score)
from rewards.similarity import changed_lines, patch_similarity
from rewards.stats import aggregate


def loop_penalty(commands: list[str], k1: int = 15, k2: int = 8, lam: float = 0.5, cap: float = -10.0) -> float:
    """R_loop of one trajectory's bash commands, in order."""
    return loop_reward(streaks(commands), k1, k2, lam, cap)


__all__ = ["Action", "Curriculum", "ExpertCall", "NAVIGATION", "RewardBreakdown", "RewardConfig", "RewardInput",
           "Stage", "aggregate", "changed_lines", "gate", "loop_penalty", "loop_reward", "normalize_action",
           "normalize_command", "patch_similarity", "run_lengths", "score", "streaks"]
