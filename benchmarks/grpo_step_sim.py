"""A discrete-event model of GRPO steps on N GPUs: how long a step takes, what the GPU does meanwhile, and
which rollout schedule is fastest at the paper's setting. Every figure it prints is SIMULATED.

    python benchmarks/grpo_step_sim.py [--out benchmarks/results] [--updates 6] [--seed 0] [--policy NAME]

(about 100 s) writes grpo_step_sim.json, grpo_step_sim.md (the policies at the start and the end of RL, a
sensitivity table, the inputs with their sources, the validation against a real CPU run when
grpo_sim_validation.json exists) and grpo_step_sim_{start,end}.png (the running batch over time, one panel per
policy). `python benchmarks/grpo_sim_validation.py` makes the validation (a real GRPO run of the engine on this
CPU, the simulator fed its measured costs).

The model. Each rank runs its trajectories; a trajectory is a chain of phases: its environment starts, then
per turn the sampler prefills the new tokens and decodes the turn, then the environment (a command, the
tests, or an expert call) answers; after the last turn the judge, the environment's close and the
evaluation (a fresh environment and the tests). A rank's sampler batches every trajectory that waits for a
model turn (continuous batching: decode rows first, then prefill chunks within the step's token budget).
A step costs a roofline: max(bytes moved / bandwidth, FLOPs / compute) at stated shares of the device's
peaks, plus host time per step and per row. The update is a collective (FSDP2): every rank trains at once,
for the time of the rank with the most tokens. Weights that change under a trajectory in flight make its
KV stale: its next turn prefills its whole context again (the sampler drops cached prefixes on new weights).
"""
from __future__ import annotations

import argparse
import heapq
import json
import math
import random
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------- inputs

@dataclass(frozen=True)
class Dist:
    """One input's distribution: 'const' (median), 'lognormal' (median, sigma), 'choice' (values drawn
    uniformly: an empirical sample); clipped to [low, high]. `source` says where it comes from."""
    kind: str
    median: float = 0.0
    sigma: float = 0.0
    values: tuple = ()
    low: float = 0.0
    high: float = math.inf
    source: str = ""

    def draw(self, rng: random.Random) -> float:
        if self.kind == "const":
            x = self.median
        elif self.kind == "lognormal":
            x = self.median * math.exp(self.sigma * rng.gauss(0.0, 1.0))
        elif self.kind == "choice":
            x = rng.choice(self.values)
        else:
            raise ValueError(f"Dist: unknown kind {self.kind!r}")
        return min(self.high, max(self.low, x))

    def describe(self) -> str:
        if self.kind == "const":
            return f"{self.median:g}"
        if self.kind == "lognormal":
            return f"lognormal, median {self.median:g}, sigma {self.sigma:g}, in [{self.low:g}, {self.high:g}]"
        return f"{len(self.values)} measured values, mean {sum(self.values) / len(self.values):.3g}"


def const(x: float, source: str = "") -> Dist:
    return Dist("const", x, source=source)


@dataclass(frozen=True)
class Workload:
    """What one trajectory does, as distributions (drawn per trajectory, per turn or per action)."""
    turns: Dist               # model turns per trajectory (capped by the step config's max_steps)
    prompt_tokens: Dist       # system prompt + task statement (shared by a group: the prefix cache)
    policy_tokens: Dist       # tokens the model generates per turn
    observation_tokens: Dist  # tokens of a tool's (or the expert's) answer
    command_s: Dist           # an ordinary command (ls, grep, an edit)
    test_share: float         # share of commands that run tests
    test_run_s: Dist          # a command that runs tests
    expert_calls: Dist        # ask_expert calls per trajectory
    expert_s: Dist            # one expert (or judge) call
    env_start_s: Dist         # the trajectory's environment (container or sandbox) starting
    env_close_s: Dist
    evaluation_s: Dist        # after the run: a fresh environment, the patch, the tests (0: no patch)


@dataclass(frozen=True)
class Model:
    name: str
    params: float             # parameters (2 FLOPs each per token in a forward)
    layers: int
    hidden: int               # attention's width (heads x head_dim), for its FLOPs
    weight_bytes: float       # read once per sampler step
    kv_bytes_per_token: float


@dataclass(frozen=True)
class Device:
    """Costs in seconds per unit, from first principles (gpu_device) or fitted on a CPU (the validation)."""
    name: str
    weights_s: float          # reading the weights once (a sampler step's floor)
    kv_s_per_token: float     # reading one token's KV
    token_s: float            # one token's matmuls through the model (2 x params FLOPs) in a sampler step
    attention_s_per_pair: float   # one (query, key) pair of attention in a prefill
    step_host_s: float        # host time per sampler step beyond the roofline
    row_host_s: float         # host time per sequence in a step
    train_token_s: float      # one trained token, forward + backward (6 x params FLOPs at the training MFU)
    train_pair_s: float       # one causal (query, key) pair of attention in training, forward + backward
    forward_token_s: float    # one token in a no-grad forward (old log-probs, the reference)
    update_fixed_s: float     # per update: optimizer step, rollout-mode switch in and out, collectives' floor
    micro_batch_s: float = 1.0   # one training micro-batch: how soon an update running in a gap can yield
    additive: bool = False    # memory and compute time add (one CPU core does both) instead of overlapping
    sources: dict = field(default_factory=dict)


@dataclass(frozen=True)
class StepConfig:
    ranks: int
    prompts_per_step: int
    group_size: int
    max_steps: int
    max_context: int
    max_turn_tokens: int
    max_envs: int             # trajectories at once per rank
    extra_forwards: int       # no-grad forwards per update: old log-probs (fast mode) and the reference (KL)
    prefill_budget: int = 4096   # tokens per sampler step (Sampler.max_num_batched_tokens)

    @property
    def per_rank(self) -> int:
        return self.prompts_per_step * self.group_size // self.ranks


@dataclass(frozen=True)
class Policy:
    """How rollout and update are scheduled.
    sync: today's step (rollouts, a barrier, the update); overlap: the update of step s runs in the
    windows where every rank's trajectories wait on their environments during step s+1's rollouts (one step
    off); partial: a rank keeps `concurrency` trajectories running across updates, the update takes the
    first prompts_per_step complete groups, and no trajectory spans more than `staleness` updates."""
    name: str
    kind: str                 # "sync" | "overlap" | "partial"
    prompts_per_step: int | None = None   # None: the config's
    concurrency: int | None = None        # trajectories at once per rank (None: the config's max_envs)
    staleness: int = 1
    note: str = ""


# ---------------------------------------------------------------------------------------------- plans

@dataclass
class Turn:
    prefill: int              # new tokens before the turn's generation
    decode: int               # tokens generated
    action_s: float           # the environment's answer after it (0 after the last turn)


@dataclass
class Plan:
    """One trajectory, drawn before it runs."""
    start_s: float
    turns: list[Turn]
    end_s: float              # judge + close + evaluation, after the last turn

    @property
    def tokens(self) -> int:
        return sum(t.prefill + t.decode for t in self.turns)


def draw_plan(w: Workload, cfg: StepConfig, rng: random.Random, prompt: int) -> Plan:
    """A trajectory of the workload: turns until the drawn count, max_steps or the context is full."""
    n = max(1, min(cfg.max_steps, round(w.turns.draw(rng))))
    asks = set(rng.sample(range(n - 1), min(n - 1, round(w.expert_calls.draw(rng))))) if n > 1 else set()
    turns, context, new = [], 0, prompt
    for i in range(n):
        decode = min(cfg.max_turn_tokens, max(1, round(w.policy_tokens.draw(rng))))
        room = cfg.max_context - context - new
        if room <= 0:
            break
        decode = min(decode, room)
        context += new + decode
        last = i == n - 1 or context >= cfg.max_context
        action = 0.0 if last else w.expert_s.draw(rng) if i in asks else \
            w.test_run_s.draw(rng) if rng.random() < w.test_share else w.command_s.draw(rng)
        turns.append(Turn(new, decode, action))
        if last:
            break
        new = round(w.observation_tokens.draw(rng))
    judge = sum(w.expert_s.draw(rng) for _ in range(len(asks)))
    return Plan(w.env_start_s.draw(rng), turns, judge + w.env_close_s.draw(rng) + w.evaluation_s.draw(rng))


def draw_group(w: Workload, cfg: StepConfig, rng: random.Random) -> list[Plan]:
    prompt = round(w.prompt_tokens.draw(rng))
    return [draw_plan(w, cfg, rng, prompt) for _ in range(cfg.group_size)]


# ---------------------------------------------------------------------------------------------- costs

def roofline(d: Device, memory: float, compute: float) -> float:
    return memory + compute if d.additive else max(memory, compute)


def decode_step_s(d: Device, rows: int, context: int) -> float:
    """One decode step of `rows` sequences holding `context` tokens of KV in all."""
    return d.step_host_s + d.row_host_s * rows + roofline(d, d.weights_s + d.kv_s_per_token * context,
                                                          d.token_s * rows)


def decode_run_s(d: Device, rows: int, context: int, n: int) -> float:
    """n decode steps in a row; each adds `rows` tokens of KV (closed form of the sum of decode_step_s)."""
    if n <= 0:
        return 0.0
    host = n * (d.step_host_s + d.row_host_s * rows)
    a, k, c = d.weights_s + d.kv_s_per_token * context, d.kv_s_per_token * rows, d.token_s * rows
    if d.additive:
        return host + n * (a + c) + k * n * (n - 1) / 2
    # steps below the crossover are compute-bound (c), the rest read bandwidth (a + k i)
    cross = n if k == 0 and a < c else 0 if a >= c else min(n, math.ceil((c - a) / k))
    memory = (n - cross) * a + k * (n * (n - 1) - cross * (cross - 1)) / 2
    return host + cross * c + memory


def steps_within(d: Device, rows: int, context: int, dt: float, n_max: int) -> int:
    """The fewest decode steps (>= 1) whose run reaches dt: the step in flight at dt completes."""
    lo, hi = 1, n_max
    while lo < hi:
        mid = (lo + hi) // 2
        if decode_run_s(d, rows, context, mid) >= dt:
            hi = mid
        else:
            lo = mid + 1
    return lo


def mixed_step_s(d: Device, rows: int, context: int, chunks: list[tuple[int, int]]) -> tuple[float, float]:
    """A step of `rows` decode rows and prefill chunks (tokens, tokens before them): (decode part, prefill
    part), the prefill part being what the chunks add to the step."""
    tokens = sum(c for c, _ in chunks)
    pairs = sum(c * (before + (c + 1) / 2) for c, before in chunks)
    kv = context + sum(before for _, before in chunks)
    total = d.step_host_s + d.row_host_s * (rows + len(chunks)) + roofline(
        d, d.weights_s + d.kv_s_per_token * kv, d.token_s * (rows + tokens) + d.attention_s_per_pair * pairs)
    decode = decode_step_s(d, rows, context) if rows else 0.0
    return decode, total - decode


def training_s(d: Device, lengths: list[int], extra_forwards: int) -> float:
    """One rank's update over trajectories of these lengths: forward + backward, the no-grad forwards."""
    if not lengths:
        return 0.0
    tokens, pairs = sum(lengths), sum(n * (n + 1) / 2 for n in lengths)
    grad = d.train_token_s * tokens + d.train_pair_s * pairs
    forward = extra_forwards * (d.forward_token_s * tokens + d.train_pair_s / 3 * pairs)
    return grad + forward


# ---------------------------------------------------------------------------------------------- simulation

@dataclass
class Traj:
    plan: Plan
    group: int
    rank: int
    born: int                 # weight version when it started
    turn: int = 0
    context: int = 0          # tokens whose KV the sampler holds
    kv_version: int = -1      # the weights that KV was computed with
    prefill_left: int = 0
    decode_left: int = 0
    versions: Counter = field(default_factory=Counter)   # generated tokens per weight version
    prefilled: int = 0        # tokens it put through a prefill, stale KV recomputed included
    done: bool = False


@dataclass
class Segment:
    """A rank's sampler work in flight: one step with prefill chunks, or a run of decode steps (which an
    arrival or a pause cuts short after the step in flight)."""
    start: float
    rows: list[Traj]
    steps: int
    context: int
    chunks: list[tuple[Traj, int]]
    decode_s: float
    prefill_s: float
    token: int

    @property
    def end(self) -> float:
        return self.start + self.decode_s + self.prefill_s


@dataclass
class RankState:
    index: int
    ready: list[Traj] = field(default_factory=list)    # turns that arrived during a step or an update
    active: list[Traj] = field(default_factory=list)   # in the sampler's batch
    segment: Segment | None = None
    training: bool = False
    queued: list[tuple[Plan, int]] = field(default_factory=list)   # trajectories waiting for a slot
    running: int = 0          # trajectories started and not finished
    intervals: list[tuple[float, float, str]] = field(default_factory=list)   # GPU busy: (start, end, phase)
    trace: list[tuple[float, int]] = field(default_factory=list)   # (time, sequences in the sampler)


@dataclass
class Result:
    policy: str
    step_s: float                 # SIMULATED: mean time between updates over the measured window
    trajectories_per_gpu_hour: float
    off_policy_token_share: float     # generated tokens trained after an update newer than their weights
    busy_share: dict                  # prefill, decode, training, idle: mean over ranks in the window
    updates: int
    mean_running_batch: float         # rank 0, time-weighted, the window
    trace: list                       # rank 0: (time, sequences) in the window, time from its start
    update_times: list


class Simulation:
    """One run of a policy. Events are (time, callback); each rank's sampler is a chain of segments."""

    def __init__(self, cfg: StepConfig, workload: Workload | None, device: Device, policy: Policy, seed: int = 0,
                 plans=None):
        """plans: optional callable(step, group) -> G Plans (replayed trajectories); else the workload's."""
        self.cfg = replace(cfg, prompts_per_step=policy.prompts_per_step or cfg.prompts_per_step)
        self.w, self.d, self.policy, self.plans = workload, device, policy, plans
        self.concurrency = policy.concurrency or self.cfg.max_envs
        self.rng = random.Random(seed)
        self.now, self.version, self.rollout_step = 0.0, 0, 0
        self._events: list = []
        self._counter = 0
        self.ranks = [RankState(r) for r in range(self.cfg.ranks)]
        self.members: dict[int, list[Traj]] = {}
        self.step_of: dict[int, int] = {}           # the rollout step a group belongs to
        self.complete: list[int] = []               # finished groups not yet trained, in order
        self.updates: list[float] = []              # when each update ended
        self.trained = Counter()                    # generated tokens trained: "on" / "off" policy
        self.pending: tuple[list[int], float] | None = None   # overlap: (groups, training seconds left)
        self.gap: tuple[float, int] | None = None   # overlap: an update running in a gap (start, token)
        self.gap_yield = False
        self.target = 0                             # updates to run (run())

    def tick(self) -> int:
        self._counter += 1
        return self._counter

    def at(self, t: float, fn, *args) -> None:
        heapq.heappush(self._events, (t, self.tick(), fn, args))

    def run(self, updates: int) -> None:
        self.target = updates
        self._start_rollouts()
        while self._events and len(self.updates) < updates:
            t, _, fn, args = heapq.heappop(self._events)
            self.now = t
            fn(*args)

    # -- trajectories ----------------------------------------------------------------------------------
    def _new_group(self, rank: RankState) -> None:
        g = len(self.members)
        plans = self.plans(self.rollout_step, g) if self.plans else draw_group(self.w, self.cfg, self.rng)
        self.members[g], self.step_of[g] = [], self.rollout_step
        rank.queued += [(plan, g) for plan in plans]
        self._admit(rank)

    def _admit(self, rank: RankState) -> None:
        while rank.queued and rank.running < self.concurrency:
            plan, g = rank.queued.pop(0)
            traj = Traj(plan, g, rank.index, born=self.version)
            self.members[g].append(traj)
            rank.running += 1
            self.at(self.now + plan.start_s, self._turn_ready, traj)

    def _turn_ready(self, traj: Traj) -> None:
        turn = traj.plan.turns[traj.turn]
        traj.prefill_left, traj.decode_left = turn.prefill, turn.decode
        if traj.context and traj.kv_version != self.version:   # new weights: its KV is stale, recomputed
            traj.prefill_left += traj.context
            traj.context = 0
        elif traj.turn == 0 and any(o.context >= turn.prefill and o.kv_version == self.version
                                    for o in self.members[traj.group]):
            traj.context, traj.prefill_left = turn.prefill - 1, 1   # the group's prompt is in the prefix cache
        traj.kv_version = self.version
        rank = self.ranks[traj.rank]
        rank.ready.append(traj)
        if self.gap is not None and not self.gap_yield:
            self._yield_gap()
        if rank.segment is not None:
            self._truncate(rank)
        else:
            self._kick(rank)

    def _turn_done(self, traj: Traj) -> None:
        action = traj.plan.turns[traj.turn].action_s
        traj.turn += 1
        if traj.turn < len(traj.plan.turns):
            self.at(self.now + action, self._turn_ready, traj)
        else:
            self.at(self.now + traj.plan.end_s, self._finished, traj)

    def _finished(self, traj: Traj) -> None:
        traj.done = True
        rank = self.ranks[traj.rank]
        rank.running -= 1
        self._admit(rank)
        group = self.members[traj.group]
        if len(group) == self.cfg.group_size and all(t.done for t in group):
            self.complete.append(traj.group)
            self._group_complete()

    # -- the sampler -----------------------------------------------------------------------------------
    def _kick(self, rank: RankState) -> None:
        """Start the rank's next sampler segment, if it samples now and has work."""
        if rank.training or rank.segment is not None:
            return
        rank.active += rank.ready
        rank.ready = []
        if not rank.active:
            rank.trace.append((self.now, 0))
            self._try_gap()
            return
        rows = [t for t in rank.active if t.prefill_left == 0]
        context = sum(t.context for t in rows)
        chunks, budget = [], self.cfg.prefill_budget - len(rows)
        for t in rank.active:
            if t.prefill_left and budget > 0:
                chunks.append((t, min(t.prefill_left, budget)))
                budget -= chunks[-1][1]
        if chunks:
            decode_s, prefill_s = mixed_step_s(self.d, len(rows), context, [(c, t.context) for t, c in chunks])
            steps = 1
        else:
            steps = min(t.decode_left for t in rows)
            decode_s, prefill_s = decode_run_s(self.d, len(rows), context, steps), 0.0
        rank.segment = Segment(self.now, rows, steps, context, chunks, decode_s, prefill_s, self.tick())
        rank.trace.append((self.now, len(rows) + len(chunks)))
        self.at(rank.segment.end, self._segment_done, rank, rank.segment.token)

    def _truncate(self, rank: RankState) -> None:
        """An arrival or a pause: a decode run stops after the step in flight (the scheduler's next step
        admits the newcomer)."""
        seg = rank.segment
        if seg.chunks or seg.steps <= 1:
            return
        n = steps_within(self.d, len(seg.rows), seg.context, self.now - seg.start, seg.steps)
        if n < seg.steps:
            seg.steps, seg.decode_s, seg.token = n, decode_run_s(self.d, len(seg.rows), seg.context, n), self.tick()
            self.at(seg.end, self._segment_done, rank, seg.token)

    def _segment_done(self, rank: RankState, token: int) -> None:
        seg = rank.segment
        if seg is None or seg.token != token:
            return   # cut short: a later event ends it
        rank.segment = None
        rank.intervals.append((seg.start, seg.start + seg.decode_s, "decode"))
        rank.intervals.append((seg.start + seg.decode_s, seg.end, "prefill"))
        for t in seg.rows:
            t.context += seg.steps
            t.decode_left -= seg.steps
            t.versions[self.version] += seg.steps
        for t, c in seg.chunks:
            t.context += c
            t.prefill_left -= c
            t.prefilled += c
            if t.prefill_left == 0:   # the step that ends a prompt samples the turn's first token
                t.context += 1
                t.decode_left -= 1
                t.versions[self.version] += 1
        done = [t for t in rank.active if t.prefill_left == 0 and t.decode_left <= 0]
        rank.active = [t for t in rank.active if not (t.prefill_left == 0 and t.decode_left <= 0)]
        for t in done:
            self._turn_done(t)
        self._kick(rank)

    # -- rollout steps and updates ---------------------------------------------------------------------
    def _start_rollouts(self) -> None:
        """A step's groups, dealt to the ranks in turn (partial: every rank's slots filled with groups)."""
        if self.policy.kind == "partial":
            for rank in self.ranks:
                self._fill(rank)
            return
        for g in range(self.cfg.prompts_per_step):
            self._new_group(self.ranks[g % self.cfg.ranks])
        self._try_gap()

    def _fill(self, rank: RankState) -> None:
        while rank.running + len(rank.queued) + self.cfg.group_size <= self.concurrency:
            self._new_group(rank)

    def _group_complete(self) -> None:
        if self.policy.kind == "partial":
            for rank in self.ranks:
                self._fill(rank)
            self._maybe_partial_update()
            return
        mine = [g for g in self.complete if self.step_of[g] == self.rollout_step]
        if len(mine) < self.cfg.prompts_per_step:
            return
        self.complete = [g for g in self.complete if g not in mine]
        if self.policy.kind == "sync":
            self._update(mine, self._next_rollouts)
        else:
            self._overlap_rollouts_done(mine)

    def _next_rollouts(self) -> None:
        if len(self.updates) >= self.target and self.policy.kind == "sync":
            return   # the run is over: no step after the last update
        self.rollout_step += 1
        self._start_rollouts()

    def _update_seconds(self, groups: list[int]) -> float:
        """The collective update: every rank trains as long as the rank with the most work."""
        lengths = [[] for _ in self.ranks]
        for g in groups:
            for t in self.members[g]:
                lengths[t.rank].append(t.context)
        return self.d.update_fixed_s + max(training_s(self.d, x, self.cfg.extra_forwards) for x in lengths)

    def _count_policy(self, groups: list[int]) -> None:
        """Generated tokens of weights older than the ones being updated are off-policy."""
        for g in groups:
            for t in self.members[g]:
                for v, n in t.versions.items():
                    self.trained["off" if v < self.version else "on"] += n

    def _update(self, groups: list[int], then, seconds: float | None = None) -> None:
        """A blocking update: every sampler stops after its step in flight, then all ranks train."""
        seconds = self._update_seconds(groups) if seconds is None else seconds
        self._count_policy(groups)
        for rank in self.ranks:
            rank.training = True
            if rank.segment is not None:
                self._truncate(rank)
        start = max([self.now] + [r.segment.end for r in self.ranks if r.segment is not None])
        for rank in self.ranks:
            rank.intervals.append((start, start + seconds, "training"))
            rank.trace.append((start, 0))   # the sampler is out of the batch while the update runs
        self.at(start + seconds, self._update_done, then)

    def _update_done(self, then) -> None:
        self.version += 1
        self.updates.append(self.now)
        for rank in self.ranks:
            rank.training = False
        then()
        for rank in self.ranks:
            self._kick(rank)

    # -- partial rollouts --------------------------------------------------------------------------------
    def _maybe_partial_update(self) -> None:
        if any(r.training for r in self.ranks) or len(self.complete) < self.cfg.prompts_per_step:
            return
        # Bounded staleness: every trajectory in flight must still be trainable after this update.
        oldest = min((t.born for ts in self.members.values() for t in ts if not t.done), default=self.version)
        if self.version - oldest >= self.policy.staleness:
            return   # tried again when the next group completes
        batch, self.complete = self.complete[:self.cfg.prompts_per_step], self.complete[self.cfg.prompts_per_step:]
        self._update(batch, self._after_partial_update)

    def _after_partial_update(self) -> None:
        for rank in self.ranks:
            self._fill(rank)
        self._maybe_partial_update()

    # -- updates overlapped with environment time ----------------------------------------------------------
    def _overlap_rollouts_done(self, groups: list[int]) -> None:
        """Step s's rollouts are done: step s-1's update, if the gaps did not finish it, finishes now;
        then step s+1's rollouts start and step s's update waits for gaps."""
        if self.pending is not None:
            previous, left = self.pending
            if self.gap is not None:
                left = self._close_gap()
            self.pending = None
            self._update(previous, lambda: self._overlap_next(groups), seconds=left)
            return
        self._overlap_next(groups)

    def _overlap_next(self, groups: list[int]) -> None:
        self.pending = (groups, self._update_seconds(groups))
        self._next_rollouts()

    def _try_gap(self) -> None:
        """Every rank's sampler idle (its trajectories all wait on environments): the pending update runs."""
        if self.policy.kind != "overlap" or self.pending is None or self.gap is not None:
            return
        if any(r.training or r.segment is not None or r.ready or r.active for r in self.ranks):
            return
        for rank in self.ranks:
            rank.training = True
        self.gap, self.gap_yield = (self.now, self.tick()), False
        self.at(self.now + self.pending[1], self._gap_end, self.gap[1])

    def _yield_gap(self) -> None:
        """A turn arrived: the trainer stops after its micro-batch in flight."""
        start, token = self.gap
        micro = self.d.micro_batch_s
        done = min(self.pending[1], math.ceil(max(self.now - start, 1e-12) / micro) * micro)
        self.gap_yield = True
        self.at(start + done, self._gap_end, token)

    def _close_gap(self) -> float:
        """The gap ends now: the ranks sample again; returns the update's seconds still to run."""
        start, _ = self.gap
        self.gap = None
        for rank in self.ranks:
            rank.intervals.append((start, self.now, "training"))
            rank.training = False
        return self.pending[1] - (self.now - start)

    def _gap_end(self, token: int) -> None:
        if self.gap is None or self.gap[1] != token:
            return
        groups, _ = self.pending
        left = self._close_gap()
        if left <= 1e-9:   # the update is done: the samplers switch to the new weights
            self.pending = None
            self._count_policy(groups)
            self.version += 1
            self.updates.append(self.now)
        else:
            self.pending = (groups, left)
        for rank in self.ranks:
            self._kick(rank)


def simulate(cfg: StepConfig, workload: Workload | None, device: Device, policy: Policy, updates: int,
             warmup: int = 1, seed: int = 0, plans=None) -> Result:
    """Runs until `updates` updates; the figures cover those after the first `warmup` (a schedule's start)."""
    sim = Simulation(cfg, workload, device, policy, seed, plans)
    sim.run(updates)
    if len(sim.updates) < updates:
        raise RuntimeError(f"{policy.name}: the simulation stopped after {len(sim.updates)} of {updates} updates")
    t0 = sim.updates[warmup - 1] if warmup else 0.0
    t1 = sim.updates[-1]
    busy = Counter()
    for rank in sim.ranks:
        for phase, seconds in busy_in_window(rank.intervals, t0, t1).items():
            busy[phase] += seconds / len(sim.ranks) / (t1 - t0)
    shares = {k: busy[k] for k in ("prefill", "decode", "training")}
    shares["idle"] = max(0.0, 1.0 - sum(shares.values()))
    step = (t1 - t0) / (updates - warmup)
    trajectories = sim.cfg.prompts_per_step * sim.cfg.group_size
    trace = window_trace(sim.ranks[0].trace, t0, t1)
    total = sum(sim.trained.values())
    return Result(policy.name, step, trajectories / (step * sim.cfg.ranks / 3600.0),
                  sim.trained["off"] / total if total else 0.0, shares, updates - warmup,
                  time_weighted_mean(trace, t1 - t0), trace, [u - t0 for u in sim.updates[warmup:]])


def busy_in_window(intervals: list[tuple[float, float, str]], t0: float, t1: float) -> Counter:
    out = Counter()
    for a, b, phase in intervals:
        out[phase] += max(0.0, min(b, t1) - max(a, t0))
    return out


def window_trace(trace: list[tuple[float, int]], t0: float, t1: float) -> list[tuple[float, int]]:
    """The running batch inside [t0, t1], times from t0 (the value at t0 carried in)."""
    trace = sorted(trace, key=lambda x: x[0])
    before = [n for t, n in trace if t <= t0]
    out = [(0.0, before[-1] if before else 0)]
    out += [(t - t0, n) for t, n in trace if t0 < t <= t1]
    return out


def time_weighted_mean(trace: list[tuple[float, int]], end: float) -> float:
    if not trace or end <= trace[0][0]:
        return 0.0
    times = [t for t, _ in trace] + [end]
    return sum(n * (times[i + 1] - times[i]) for i, (_, n) in enumerate(trace)) / (end - trace[0][0])


# ---------------------------------------------------------------------------------------------- the paper's setting

H200_REPORT = "benchmarks/results/nvidia-h200/quick-7900a83/report.md (GPU suite --quick on one H200, 2026-12-04)"
ASSUMED = "ASSUMPTION (no measurement here; change it and rerun)"

QWEN25_7B = Model("Qwen2.5-Coder-7B", params=7.62e9, layers=28, hidden=3584, weight_bytes=15.23e9,
                  kv_bytes_per_token=2 * 28 * 4 * 128 * 2)   # K and V, 28 layers, 4 KV heads x 128, bf16


def gpu_device(model: Model = QWEN25_7B, hbm: float = 4.8e12, peak: float = 989e12, decode_share: float = 0.413,
               prefill_share: float = 0.45, attention_share: float = 0.33, train_attention_share: float = 0.21,
               train_mfu: float = 0.379, update_fixed_s: float = 2.5, micro_batch_tokens: int = 32768) -> Device:
    """One H200 from first principles: bytes / (datasheet bandwidth x the share the sampler reached),
    FLOPs / (datasheet peak x the share each kind of work reached), all shares measured on an H200 except
    prefill_share (between the measured matmul and attention shares) and the update's fixed cost."""
    bw = hbm * decode_share
    pair = 4 * model.layers * model.hidden          # QK^T and PV FLOPs per (query, key) pair
    train_token_s = 6 * model.params / (peak * train_mfu)
    sources = {
        "hbm": f"{hbm / 1e12:g} TB/s datasheet (H200); copy measured 4.17 TB/s, {H200_REPORT}",
        "peak": f"{peak / 1e12:g} TFLOP/s bf16 dense datasheet; matmul 8192^3 measured 687.6, {H200_REPORT}",
        "decode_share": f"{decode_share}: sampler throughput / bandwidth bound (weights + KV per step), 64 prompts "
                        f"at the 7B shape, {H200_REPORT}; single-stream 0.418. Host time per step is inside it",
        "prefill_share": f"{prefill_share}: {ASSUMED}; measured on the H200 forward shares: linear 0.50 (Triton) "
                         f"/ 0.69 (eager), varlen attention 0.33-0.41, token_logprobs 0.38",
        "attention_share": f"{attention_share}: varlen attention forward, Triton, 8192 tokens, {H200_REPORT}",
        "train_attention_share": f"{train_attention_share}: varlen attention forward+backward, Triton, {H200_REPORT}",
        "train_mfu": f"{train_mfu}: SFT step at the 7B shape, 2048-token documents, extrapolated from 19 layers "
                     f"to 28 (EXTRAPOLATED), {H200_REPORT}",
        "update_fixed_s": f"{update_fixed_s} s: {ASSUMED}: rollout-mode switch (measured 8.3 ms on one rank, "
                          f"{H200_REPORT}; 8 ranks all-gather 15.2 GB), optimizer step, CUDA graphs recaptured "
                          f"for the new weights (UNMEASURED), the KV pool rebuilt",
        "micro_batch": f"{micro_batch_tokens} tokens (configs/grpo-qwen2.5-coder-7b.toml train.micro_batch_tokens)",
    }
    return Device("H200 (first principles, measured shares)", weights_s=model.weight_bytes / bw,
                  kv_s_per_token=model.kv_bytes_per_token / bw, token_s=2 * model.params / (peak * prefill_share),
                  attention_s_per_pair=pair / (peak * attention_share), step_host_s=0.0, row_host_s=0.0,
                  train_token_s=train_token_s, train_pair_s=3 * pair / (peak * train_attention_share),
                  forward_token_s=2 * model.params / (peak * prefill_share), update_fixed_s=update_fixed_s,
                  micro_batch_s=micro_batch_tokens * train_token_s, sources=sources)


PAPER = "method.md (arXiv 2602.22124; (†) = from a digest, unconfirmed)"


def paper_workload(phase: str = "start") -> Workload:
    """The paper's agent at the start of RL (after SFT: ~60 steps) or its end (~20 at evaluation, 35-40 late in
    training); the rest stated assumptions."""
    turns = {"start": Dist("lognormal", 60, 0.3, low=3, high=60,
                           source=f"~60 steps after SFT, 55-65 early in training (†), {PAPER}; capped by max_steps"),
             "end": Dist("lognormal", 35, 0.35, low=3, high=60,
                         source=f"35-40 steps late in training, ~20 at evaluation (†), {PAPER}")}[phase]
    return Workload(
        turns=turns,
        prompt_tokens=Dist("lognormal", 2000, 0.4, low=500, high=8000,
                           source=f"{ASSUMED}: system prompt + tools + a SWE-Gym issue"),
        policy_tokens=Dist("lognormal", 150, 0.7, low=10, high=2048,
                           source=f"{ASSUMED}: a short thought + one tool call; with the observations, 60 turns "
                                  f"fill ~30K tokens, as the paper's 'up to ~32K' ({PAPER})"),
        observation_tokens=Dist("lognormal", 250, 1.0, low=10, high=2900,
                                source=f"{ASSUMED}; capped at 10,000 characters (AgentConfig.max_observation_chars)"),
        command_s=Dist("lognormal", 0.5, 0.8, low=0.05, high=120, source=f"{ASSUMED}: docker exec + a shell command"),
        test_share=0.1,
        test_run_s=Dist("lognormal", 15, 1.0, low=1, high=120,
                        source=f"{ASSUMED}: 1 command in 10 runs tests; capped by command_timeout_s = 120"),
        expert_calls=Dist("lognormal", 3, 0.5, low=0, high=6, source=f"~4 calls per task, quota 6 (†), {PAPER}"),
        expert_s=Dist("lognormal", 12, 0.5, low=2, high=120,
                      source=f"{ASSUMED}: a Claude reply of a few hundred tokens; the judge makes one call per "
                             f"answered call, after the run"),
        env_start_s=Dist("lognormal", 5, 0.5, low=1, high=120,
                         source=f"{ASSUMED}: docker run of a local SWE-Gym image"),
        env_close_s=const(1.0, f"{ASSUMED}: containers are killed, not stopped"),
        evaluation_s=Dist("lognormal", 60, 0.6, low=5, high=2100,
                          source=f"{ASSUMED}: a fresh container, the patch, the task's tests"),
    )


PAPER_CONFIG = StepConfig(ranks=8, prompts_per_step=16, group_size=6, max_steps=60, max_context=32768,
                          max_turn_tokens=2048, max_envs=16, extra_forwards=2)   # configs/grpo-qwen2.5-coder-7b.toml

POLICIES = [
    Policy("sync (today)", "sync", note="rollouts of the step, a barrier, the update (engine/training/rl.py)"),
    Policy("sync, P=32", "sync", prompts_per_step=32, concurrency=24, note="twice the prompts per step"),
    Policy("sync, P=64", "sync", prompts_per_step=64, concurrency=48,
           note="four times the prompts per step; 48 contexts of up to 32K tokens need ~1.5M tokens of KV: "
                "about an H200's pool, twice an H100's (KV capacity and preemption are not modelled)"),
    Policy("overlap", "overlap", note="step s's update in step s+1's all-ranks-idle gaps (one step off)"),
    Policy("partial, k=1, 12/rank", "partial", concurrency=12, staleness=1,
           note="12 trajectories in flight per rank (today's), continued across one update"),
    Policy("partial, k=2, 12/rank", "partial", concurrency=12, staleness=2,
           note="12 in flight per rank, continued across up to two updates"),
    Policy("partial, k=1, 24/rank", "partial", concurrency=24, staleness=1, note="24 in flight per rank"),
    Policy("partial, k=2, 24/rank", "partial", concurrency=24, staleness=2, note="24 in flight, two updates"),
]


ENVIRONMENT_TIMES = ("command_s", "test_run_s", "expert_s", "env_start_s", "env_close_s", "evaluation_s")


def scaled(workload: Workload, factor: float) -> Workload:
    """Every environment, expert and evaluation time of the workload times `factor` (sensitivity)."""
    return replace(workload, **{k: replace(getattr(workload, k), median=getattr(workload, k).median * factor)
                                for k in ENVIRONMENT_TIMES})


def compare(cfg: StepConfig, workload: Workload, device: Device, policies: list[Policy], updates: int,
            seed: int) -> list[Result]:
    results = []
    for policy in policies:
        warmup = 1 if policy.kind == "sync" else 2
        results.append(simulate(cfg, workload, device, policy, updates + warmup, warmup, seed))
    return results


# ---------------------------------------------------------------------------------------------- reports

def result_row(r: Result, base: Result) -> dict:
    return {"policy": r.policy, "step_s": round(r.step_s, 1), "speedup": round(base.step_s / r.step_s, 2),
            "trajectories_per_gpu_hour": round(r.trajectories_per_gpu_hour, 2),
            "off_policy_token_share": round(r.off_policy_token_share, 3),
            "mean_running_batch": round(r.mean_running_batch, 2),
            **{f"busy_{k}": round(v, 3) for k, v in r.busy_share.items()}}


def markdown_table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def inputs_table(workload: Workload, device: Device) -> str:
    rows = [{"input": name, "value": d.describe() if isinstance(d, Dist) else d,
             "source": d.source if isinstance(d, Dist) else "ASSUMPTION"}
            for name, d in vars(workload).items()]
    rows += [{"input": f"device: {k}", "value": "", "source": v} for k, v in device.sources.items()]
    return markdown_table(rows)


def plot_traces(named: dict[str, Result], out: Path, title: str):
    """The running batch (sequences in rank 0's sampler step) over time, a panel per policy; updates marked."""
    from protege.engine.optional import pyplot
    plt = pyplot("the running-batch plot")
    if plt is None:
        return None
    fig, axes = plt.subplots(len(named), 1, figsize=(11, 1.9 * len(named) + 0.6), dpi=100, sharex=True,
                             squeeze=False)
    axes = axes[:, 0]
    for ax, (name, r) in zip(axes, named.items()):
        times, values = zip(*r.trace) if r.trace else ((0,), (0,))
        ax.step(times, values, where="post", lw=0.6)
        for u in r.update_times:
            ax.axvline(u, color="red", lw=0.6, alpha=0.6)
        ax.set_ylabel("batch", fontsize=7)
        ax.set_title(f"{name}: SIMULATED, step {r.step_s:.0f} s, mean batch {r.mean_running_batch:.1f}",
                     fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("seconds (SIMULATED); red: an update ends")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def validation_section(path: Path) -> str:
    if not path.is_file():
        return "No validation yet: run `python benchmarks/grpo_sim_validation.py`."
    return json.loads(path.read_text())["markdown"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--updates", type=int, default=6, help="measured updates per policy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policy", action="append", help="only this policy (by name; repeatable)")
    args = ap.parse_args(argv)
    policies = [p for p in POLICIES if not args.policy or p.name in args.policy]
    args.out.mkdir(parents=True, exist_ok=True)
    device = gpu_device()
    report = {"label": "SIMULATED: no figure below was measured on a GPU except the device inputs named "
                       "with their source", "config": asdict(PAPER_CONFIG), "device": asdict(device), "phases": {}}
    md = ["# GRPO step simulator (benchmarks/grpo_step_sim.py): SIMULATED", "",
          f"`python benchmarks/grpo_step_sim.py --updates {args.updates} --seed {args.seed}`. Every step time, "
          f"share and rate here is SIMULATED; the device inputs are H200 measurements or datasheet figures, named "
          f"with their source below. Setting: configs/grpo-qwen2.5-coder-7b.toml, {PAPER_CONFIG.ranks} ranks, one "
          f"H200 each, {PAPER_CONFIG.prompts_per_step} prompts x G = {PAPER_CONFIG.group_size}.", ""]
    for phase in ("start", "end"):
        workload = paper_workload(phase)
        results = compare(PAPER_CONFIG, workload, device, policies, args.updates, args.seed)
        rows = [result_row(r, results[0]) for r in results]
        report["phases"][phase] = {"workload": {k: asdict(v) if isinstance(v, Dist) else v
                                                for k, v in vars(workload).items()}, "results": rows}
        png = plot_traces({r.policy: r for r in results}, args.out / f"grpo_step_sim_{phase}.png",
                          f"Running batch, rank 0, {phase} of RL: SIMULATED")
        md += [f"## {'Start' if phase == 'start' else 'End'} of RL ({workload.turns.source})", "",
               "SIMULATED. step_s: mean time between updates; busy_*: share of GPU time per phase (mean over "
               "ranks); off_policy_token_share: generated tokens trained after an update newer than the weights "
               "that sampled them.", "", markdown_table(rows), "",
               f"![running batch]({png.name})" if png else "(no plot: matplotlib missing)", ""]
    sensitive = [p for p in policies if p.name in ("sync (today)", "sync, P=64", "partial, k=2, 24/rank")]
    if sensitive:
        rows = []
        for factor in (0.5, 2.0):
            results = compare(PAPER_CONFIG, scaled(paper_workload("start"), factor), device, sensitive,
                              args.updates, args.seed)
            rows += [{"environment times": f"x{factor:g}", **result_row(r, results[0])} for r in results]
        report["sensitivity"] = rows
        md += ["## Sensitivity: every environment, expert and evaluation time halved or doubled (start of RL)",
               "", "SIMULATED; speedup against sync (today) at the same times.", "", markdown_table(rows), ""]
    h100 = [p for p in policies if p.name in ("sync (today)", "sync, P=32", "partial, k=2, 12/rank",
                                              "partial, k=2, 24/rank")]
    if h100:
        results = compare(PAPER_CONFIG, paper_workload("start"), gpu_device(hbm=3.35e12), h100, args.updates,
                          args.seed)
        rows = [result_row(r, results[0]) for r in results]
        report["h100"] = rows
        md += ["## On H100s (start of RL)", "", "SIMULATED: the H200's measured shares at an H100's 3.35 TB/s "
               "(datasheet; same compute), the paper's GPUs.", "", markdown_table(rows), ""]
    md += ["## Policies", ""] + [f"- {p.name}: {p.note}" for p in policies] + [""]
    md += ["## Inputs and their sources", "", inputs_table(paper_workload("start"), device), ""]
    md += ["## Validation against a real CPU GRPO run of the engine", "",
           validation_section(args.out / "grpo_sim_validation.json"), ""]
    (args.out / "grpo_step_sim.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "grpo_step_sim.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
