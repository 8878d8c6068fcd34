"""The shaped trajectory reward of method.md, term by term:

    R_total = R_loop + w_follow * R_follow + g_loop * g_follow * R_other (+ R_no_call)
    R_other = R_correct + w_sim * R_sim + w_expert * R_expert,  R_expert = R_warrant + R_b2b + R_quota

Every constant lives in RewardConfig. Defaults are the method's; where it leaves a value open the default
is marked "open" below."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from protege.rewards.normalize import normalize_action, run_lengths
from protege.rewards.similarity import patch_similarity


@dataclass(frozen=True)
class RewardConfig:
    # R_loop
    k1: int = 15
    k2: int = 8
    lam: float = 0.5
    loop_cap: float = -10.0
    # R_sim (unresolved runs only)
    w_sim: float = 0.5
    sim_threshold: float = 0.5
    # R_expert
    w_expert: float = 0.3
    tau_warrant: float = 0.5
    p_low: float = -1.0
    lambda_b2b: float = -0.5
    lambda_quota: float = -0.5   # open: per ask_expert refused over the quota
    # R_follow
    w_follow: float = 0.2
    tau_follow: float = 0.5      # open in Stage I
    p_follow_low: float = -1.0   # open in Stage I (Stage II: -2.0)
    # gates
    a1: float = -2.0
    a2: float = -5.0
    b1: float = -0.5
    b2: float = -1.5
    follow_gate: bool = False    # Stage I: g_follow = 1
    # Stage II: a trajectory without any expert call gets this added (None: off). Open: the method says
    # "-10 if the trajectory made no expert call"; we add it so the loop and correctness terms still rank
    # such trajectories among themselves.
    no_call_penalty: float | None = None

    def __post_init__(self):
        if self.k1 < 1 or self.k2 < 1:
            raise ValueError(f"reward config: k1 and k2 must be >= 1 (got k1={self.k1}, k2={self.k2})")
        if self.lam < 0 or self.loop_cap > 0:
            raise ValueError(f"reward config: need lam >= 0 and loop_cap <= 0 (got {self.lam}, {self.loop_cap})")
        if not self.a2 <= self.a1 or not self.b2 <= self.b1:
            raise ValueError(f"reward config: gate thresholds need a2 <= a1 and b2 <= b1 "
                             f"(got a1={self.a1}, a2={self.a2}, b1={self.b1}, b2={self.b2})")

    @classmethod
    def from_dict(cls, values: dict, where: str = "reward config") -> "RewardConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def with_overrides(self, **values) -> "RewardConfig":
        return replace(self, **values)


@dataclass
class ExpertCall:
    """One ask_expert call as the reward sees it: where it happened and the hidden judge's scores (the agent's
    trajectory record extends it)."""
    action_index: int                 # position of the call among the trajectory's actions
    warranted: float | None = None    # u_i in [0, 1]; None when the judge gave nothing usable
    followed: float | None = None     # f_i in [0, 1]
    refused: bool = False             # over the quota: the call was not answered


@dataclass
class Action:
    """One agent action as the reward sees it (the agent's trajectory record extends it)."""
    tool: str                         # "bash", "str_replace_editor", "submit", "ask_expert", ...
    arguments: dict = field(default_factory=dict)
    normalized: str | None = None     # normalize_action(tool, arguments), filled in when not given

    def __post_init__(self):
        if self.normalized is None:
            self.normalized = normalize_action(self.tool, self.arguments)


@dataclass
class RewardInput:
    """The minimal view of a trajectory the reward needs (the agent's record provides it)."""
    actions: list[Action]
    expert_calls: list[ExpertCall]
    resolved: bool

    def __post_init__(self):
        if not isinstance(self.resolved, bool):   # None (not evaluated) must never score as unresolved
            raise ValueError(f"RewardInput.resolved must be True or False, got {self.resolved!r} "
                             f"(evaluate the final patch before scoring)")
    patch: str = ""
    gold_patch: str = ""


@dataclass
class RewardBreakdown:
    stage: str
    R_total: float
    R_loop: float
    R_follow: float
    R_other: float
    R_correct: float
    R_sim: float
    R_expert: float
    R_warrant: float
    R_b2b: float
    R_quota: float
    R_no_call: float
    g_loop: float
    g_follow: float
    streaks: list[int]
    similarity: float | None
    expert_calls: int
    back_to_back: int
    unscored_calls: int
    judged_calls: int     # non-terminal calls with a follow score
    followed_calls: int   # of those, followed (f >= tau_follow)

    def to_dict(self) -> dict:
        return asdict(self)


def loop_reward(streak_lengths: list[int], k1: int = 15, k2: int = 8, lam: float = 0.5,
                cap: float = -10.0) -> float:
    """R_loop = max(cap, -lam * [max(0, s_1 - k1 + 1) + sum_{j>=2} max(0, s_j - k2 + 1)])."""
    excess = sum(max(0, s - (k1 if j == 0 else k2) + 1) for j, s in enumerate(streak_lengths))
    return max(cap, -lam * excess)


def action_streaks(actions: list[Action]) -> list[int]:
    """Lengths, in order, of the maximal runs of identical normalised actions (every tool: editor views are
    navigation like grep and find)."""
    return run_lengths([a.normalized for a in actions])


def loop_penalty(actions: list[Action], k1: int = 15, k2: int = 8, lam: float = 0.5, cap: float = -10.0) -> float:
    """R_loop of one trajectory's actions, in order."""
    return loop_reward(action_streaks(actions), k1, k2, lam, cap)


def gate(value: float, upper: float, lower: float) -> float:
    """0 if value <= lower, 0.5 if value <= upper, else 1."""
    if value <= lower:
        return 0.0
    if value <= upper:
        return 0.5
    return 1.0


def back_to_back_calls(actions: list[Action]) -> int:
    """Number of ask_expert actions that come right after another ask_expert action."""
    return sum(1 for prev, cur in zip(actions, actions[1:]) if prev.tool == cur.tool == "ask_expert")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def score(traj: RewardInput, cfg: RewardConfig, stage: str = "") -> RewardBreakdown:
    """Every term of the shaped reward for one trajectory under one stage's constants."""
    runs = action_streaks(traj.actions)
    r_loop = loop_reward(runs, cfg.k1, cfg.k2, cfg.lam, cfg.loop_cap)

    answered = [c for c in traj.expert_calls if not c.refused]
    warranted = [c.warranted for c in answered if c.warranted is not None]
    r_warrant = _mean([u if u >= cfg.tau_warrant else cfg.p_low for u in warranted])
    b2b = back_to_back_calls(traj.actions)
    r_b2b = max(-1.0, cfg.lambda_b2b * b2b)
    r_quota = max(-1.0, cfg.lambda_quota * sum(c.refused for c in traj.expert_calls))
    r_expert = r_warrant + r_b2b + r_quota

    # A call is terminal when no agent action follows it: there is nothing to judge it by.
    last = len(traj.actions) - 1
    followed = [c.followed for c in answered if c.action_index < last and c.followed is not None]
    r_follow = _mean([f if f >= cfg.tau_follow else cfg.p_follow_low for f in followed])

    similarity = None
    r_correct = 1.0 if traj.resolved else 0.0
    r_sim = 0.0
    if not traj.resolved:
        similarity = patch_similarity(traj.patch, traj.gold_patch)
        r_sim = 0.0 if similarity >= cfg.sim_threshold else -1.0
    r_other = r_correct + cfg.w_sim * r_sim + cfg.w_expert * r_expert

    g_loop = gate(r_loop, cfg.a1, cfg.a2)
    g_follow = gate(r_follow, cfg.b1, cfg.b2) if cfg.follow_gate else 1.0
    r_no_call = cfg.no_call_penalty if (cfg.no_call_penalty is not None and not traj.expert_calls) else 0.0
    total = r_loop + cfg.w_follow * r_follow + g_loop * g_follow * r_other + r_no_call
    unscored = sum(1 for c in answered if c.warranted is None or c.followed is None)
    return RewardBreakdown(
        stage=stage, R_total=total, R_loop=r_loop, R_follow=r_follow, R_other=r_other, R_correct=r_correct,
        R_sim=r_sim, R_expert=r_expert, R_warrant=r_warrant, R_b2b=r_b2b, R_quota=r_quota, R_no_call=r_no_call,
        g_loop=g_loop, g_follow=g_follow, streaks=runs, similarity=similarity, expert_calls=len(answered),
        back_to_back=b2b, unscored_calls=unscored, judged_calls=len(followed),
        followed_calls=sum(1 for f in followed if f >= cfg.tau_follow))

