"""The method's shaped trajectory rewards and the two-stage curriculum (../shared/reference/method.md)."""
from rewards.curriculum import Curriculum, Stage
from rewards.normalize import NAVIGATION, normalize_action, normalize_command, run_lengths, streaks
from rewards.shaping import (Action, ExpertCall, RewardBreakdown, RewardConfig, RewardInput, action_streaks, gate,
                             loop_penalty, loop_reward, score)
from rewards.similarity import changed_lines, patch_similarity
from rewards.stats import aggregate


__all__ = ["Action", "Curriculum", "action_streaks", "ExpertCall", "NAVIGATION", "RewardBreakdown", "RewardConfig", "RewardInput",
           "Stage", "aggregate", "changed_lines", "gate", "loop_penalty", "loop_reward", "normalize_action",
           "normalize_command", "patch_similarity", "run_lengths", "score", "streaks"]
