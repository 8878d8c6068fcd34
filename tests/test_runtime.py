"""The process group's timeout: derived from the rollout limits (a rank waits in a collective while another
still rolls out), checked when given, and in effect (torchrun, 2 ranks, gloo)."""
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

from protege.engine.training.config import (EVALUATION_SECONDS, ROLLOUT_MARGIN_SECONDS,
                                            SFT_PROCESS_GROUP_TIMEOUT_S, ConfigError, load_config,
                                            process_group_timeout)
from protege.engine.training.runtime import init_runtime
from protege.rollout.evaluate import evaluate_patch

REPO = Path(__file__).resolve().parent.parent
GRPO_7B = REPO / "configs" / "grpo-qwen2.5-coder-7b.toml"


def test_grpo_timeout_covers_a_ranks_longest_rollout_phase():
    cfg = load_config(GRPO_7B)
    per_trajectory = cfg.rl.max_seconds + cfg.rl.command_timeout_s + EVALUATION_SECONDS   # 1800 + 120 + 2100 s
    # 8 ranks: 2 tasks x G=6 = 12 trajectories each, all at once (max_envs 16): one round.
    assert process_group_timeout(cfg, 8) == per_trajectory + ROLLOUT_MARGIN_SECONDS == 4620.0
    # 1 rank: 96 trajectories, 16 at a time: 6 rounds.
    assert process_group_timeout(cfg, 1) == 6 * per_trajectory + ROLLOUT_MARGIN_SECONDS
    assert process_group_timeout(cfg, 8) > 600 + cfg.rl.max_seconds   # NCCL's default would abort the waiters
    # The evaluation limits counted are the ones rl.py's evaluation runs under.
    assert inspect.signature(evaluate_patch).parameters["timeout"].default + 300.0 == EVALUATION_SECONDS


def test_given_timeout_is_checked_against_the_rollout_phase():
    assert process_group_timeout(load_config(GRPO_7B, ["process_group_timeout_s=7200"]), 8) == 7200.0
    with pytest.raises(ConfigError, match=r"process_group_timeout_s = 3600 s is shorter .* on 8 rank\(s\) "
                                          r"\(4620 s"):
        process_group_timeout(load_config(GRPO_7B, ["process_group_timeout_s=3600"]), 8)
    with pytest.raises(ConfigError, match="process_group_timeout_s must be >= 0"):
        load_config(GRPO_7B, ["process_group_timeout_s=-1"])
    sft = load_config(None, ["phase='sft'", "model.path='m'", "data.train_files=['d.jsonl']"])
    assert process_group_timeout(sft, 8) == SFT_PROCESS_GROUP_TIMEOUT_S
    with pytest.raises(ConfigError, match="process group timeout 0 s: expected a positive number"):
        init_runtime("cpu", timeout_s=0)


def test_timeout_is_in_effect(tmp_path):
    """A 2 s timeout: rank 0's all-reduce gives up while rank 1 stays away for 8 s (gloo's default: 30 min)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "timeout_worker.py"), str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "rank_0.json").read_text())
    assert report["error"] is not None and "Timed out waiting 2000ms" in report["error"], report
