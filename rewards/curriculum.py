"""Two-stage curriculum: which reward constants are in force at a given RL step.

Stage I (steps 1-80) is loop-aggressive: loop penalty on, g_follow = 1, small w_follow. Stage II
(steps 81-160) adds follow-through: w_expert 0.3, w_follow 2.0, tau_follow 0.5, p_follow_low -2.0,
g_follow on, -10 for a trajectory without an expert call. Stored trajectories can be re-scored under any
stage (the method re-shapes mid-run from trajectory-level checkpoints)."""
from __future__ import annotations

from dataclasses import dataclass

from protege.rewards.shaping import RewardBreakdown, RewardConfig, RewardInput, score


@dataclass(frozen=True)
class Stage:
    name: str
    first_step: int   # inclusive, 1-based RL steps
    last_step: int    # inclusive
    reward: RewardConfig


STAGE_I_OVERRIDES = dict(w_follow=0.2, follow_gate=False, no_call_penalty=None)
STAGE_II_OVERRIDES = dict(w_expert=0.3, w_follow=2.0, tau_follow=0.5, p_follow_low=-2.0, follow_gate=True,
                          no_call_penalty=-10.0)


class Curriculum:
    def __init__(self, stages: list[Stage]):
        if not stages:
            raise ValueError("curriculum: at least one stage is needed")
        stages = sorted(stages, key=lambda s: s.first_step)
        for s in stages:
            if s.last_step < s.first_step:
                raise ValueError(f"curriculum stage {s.name!r}: last_step {s.last_step} < first_step {s.first_step}")
        for a, b in zip(stages, stages[1:]):
            if b.first_step != a.last_step + 1:
                raise ValueError(f"curriculum: stage {b.name!r} starts at step {b.first_step}, but stage "
                                 f"{a.name!r} ends at {a.last_step} (stages must be contiguous)")
        self.stages = stages

    @classmethod
    def default(cls, base: RewardConfig | None = None, stage_one_steps: int = 80,
                total_steps: int = 160) -> "Curriculum":
        base = base or RewardConfig()
        return cls([
            Stage("I", 1, stage_one_steps, base.with_overrides(**STAGE_I_OVERRIDES)),
            Stage("II", stage_one_steps + 1, total_steps, base.with_overrides(**STAGE_II_OVERRIDES)),
        ])

    @classmethod
    def from_dict(cls, spec: dict) -> "Curriculum":
        """{"base": {reward keys...}, "stages": [{"name", "first_step", "last_step", "reward": {overrides}}]}"""
        unknown = sorted(set(spec) - {"base", "stages"})
        if unknown:
            raise ValueError(f"curriculum config: unknown key(s) {unknown}; known: ['base', 'stages']")
        base = RewardConfig.from_dict(spec.get("base", {}), "curriculum.base")
        if "stages" not in spec:
            return cls.default(base)
        stages = []
        for i, st in enumerate(spec["stages"]):
            where = f"curriculum.stages[{i}]"
            missing = [k for k in ("name", "first_step", "last_step") if k not in st]
            if missing:
                raise ValueError(f"{where}: missing {missing}")
            extra = sorted(set(st) - {"name", "first_step", "last_step", "reward"})
            if extra:
                raise ValueError(f"{where}: unknown key(s) {extra}")
            merged = {**{k: getattr(base, k) for k in base.__dataclass_fields__}, **st.get("reward", {})}
            stages.append(Stage(str(st["name"]), int(st["first_step"]), int(st["last_step"]),
                                RewardConfig.from_dict(merged, f"{where}.reward")))
        return cls(stages)

    def stage_at(self, step: int) -> Stage:
        """The stage in force at a 1-based RL step; past the last stage, the last one stays in force."""
        if step < self.stages[0].first_step:
            raise ValueError(f"curriculum: step {step} is before the first stage (starts at "
                             f"{self.stages[0].first_step})")
        return next((s for s in self.stages if s.first_step <= step <= s.last_step), self.stages[-1])

    def score(self, traj: RewardInput, step: int) -> RewardBreakdown:
        stage = self.stage_at(step)
        return score(traj, stage.reward, stage.name)

    def rescore(self, trajectories: list[RewardInput], stage_name: str) -> list[RewardBreakdown]:
        """Re-shape stored trajectories under another stage's constants."""
        stage = next((s for s in self.stages if s.name == stage_name), None)
        if stage is None:
            raise ValueError(f"curriculum: no stage named {stage_name!r} (have {[s.name for s in self.stages]})")
        return [score(t, stage.reward, stage.name) for t in trajectories]
