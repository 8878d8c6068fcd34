"""benchmarks/grpo_step_sim.py, the GRPO step simulator: its cost model's closed forms, a schedule whose step
time and busy shares are known by hand, the policies' order on constructed cases, and the reports it writes.
Seconds; no GPU. (Its validation against a real CPU run is a benchmark: benchmarks/grpo_sim_validation.py.)"""
import importlib.util
import json
import math
import random
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "grpo_step_sim.py"
spec = importlib.util.spec_from_file_location("grpo_step_sim", SCRIPT)
sim = importlib.util.module_from_spec(spec)
sys.modules["grpo_step_sim"] = sim   # its dataclasses look their module up while it loads
spec.loader.exec_module(sim)


def device(**kw) -> "sim.Device":
    base = dict(weights_s=0.01, kv_s_per_token=0.0, token_s=0.0, attention_s_per_pair=0.0, step_host_s=0.0,
                row_host_s=0.0, train_token_s=0.1, train_pair_s=0.0, forward_token_s=0.0, update_fixed_s=0.9,
                micro_batch_s=0.5)
    return sim.Device("test", **{**base, **kw})


def config(**kw) -> "sim.StepConfig":
    base = dict(ranks=1, prompts_per_step=1, group_size=1, max_steps=10, max_context=4096, max_turn_tokens=64,
                max_envs=8, extra_forwards=0)
    return sim.StepConfig(**{**base, **kw})


@pytest.mark.parametrize("additive", [False, True])
def test_decode_run_is_the_sum_of_its_steps(additive):
    rng = random.Random(0)
    for _ in range(200):
        d = device(weights_s=rng.uniform(0, 0.01), kv_s_per_token=rng.uniform(0, 1e-5), token_s=rng.uniform(0, 2e-4),
                   step_host_s=rng.uniform(0, 1e-3), row_host_s=rng.uniform(0, 1e-4), additive=additive)
        rows, context, n = rng.randint(1, 64), rng.randint(0, 50000), rng.randint(1, 300)
        by_step = sum(sim.decode_step_s(d, rows, context + i * rows) for i in range(n))
        assert sim.decode_run_s(d, rows, context, n) == pytest.approx(by_step, rel=1e-9, abs=1e-12)


def test_steps_within_finishes_the_step_in_flight():
    d = device(kv_s_per_token=1e-6, token_s=1e-4)
    for dt in (1e-6, 0.05, 0.3, 1.0):
        n = sim.steps_within(d, 8, 1000, dt, 500)
        assert sim.decode_run_s(d, 8, 1000, n) >= dt
        assert n == 1 or sim.decode_run_s(d, 8, 1000, n - 1) < dt


def test_a_hand_checked_schedule():
    """One trajectory: its environment starts (1 s), turn 1 (prefill 10, decode 5), a command (3 s), turn 2
    (prefill 10, decode 5), the end (2 s). A step costs 10 ms (the weights); a prompt's last step samples its
    first token, so a turn is 1 + 4 steps: 0.05 s. Rollout 1 + 0.05 + 3 + 0.05 + 2 = 6.1 s; the update is
    0.9 s + 30 tokens x 0.1 s = 3.9 s; a step 10 s."""
    plan = sim.Plan(1.0, [sim.Turn(10, 5, 3.0), sim.Turn(10, 5, 0.0)], 2.0)
    r = sim.simulate(config(), None, device(), sim.Policy("sync", "sync"), updates=3, warmup=1,
                     plans=lambda step, group: [plan])
    assert r.step_s == pytest.approx(10.0)
    assert r.busy_share["prefill"] == pytest.approx(0.02 / 10)
    assert r.busy_share["decode"] == pytest.approx(0.08 / 10)
    assert r.busy_share["training"] == pytest.approx(3.9 / 10)
    assert r.busy_share["idle"] == pytest.approx(1 - 4.0 / 10)
    assert r.trajectories_per_gpu_hour == pytest.approx(360.0)
    assert r.off_policy_token_share == 0.0
    assert max(n for _, n in r.trace) == 1


def test_two_trajectories_share_the_decode_steps():
    """Two trajectories that arrive together decode in the same steps: the rollout is not twice as long."""
    one = sim.Plan(0.0, [sim.Turn(1, 101, 0.0)], 0.0)
    d = device(train_token_s=0.0, update_fixed_s=1.0)
    single = sim.simulate(config(), None, d, sim.Policy("sync", "sync"), 3, 1, plans=lambda s, g: [one])
    pair = sim.simulate(config(group_size=2), None, d, sim.Policy("sync", "sync"), 3, 1, plans=lambda s, g: [one, one])
    assert single.step_s == pytest.approx(1.0 + 101 * 0.01)
    # The second arrives while the first's prompt step runs: it joins the next step, one step behind.
    assert pair.step_s == pytest.approx(single.step_s + 0.01)
    # In the step's 2.02 s: 1 sequence for 0.02 s, 2 for 1.0 s, none for the 1 s update.
    assert pair.mean_running_batch == pytest.approx((0.02 * 1 + 1.0 * 2) / 2.02)
    assert max(n for _, n in pair.trace) == 2


def straggler_plans(step: int, group: int) -> list:
    """Every group has one trajectory whose command takes 60 s; the others take 5 s."""
    turn = lambda seconds: sim.Turn(20, 20, seconds)
    return [sim.Plan(1.0, [turn(60.0 if i == 0 and group % 2 == 0 else 5.0), turn(0.0)], 1.0) for i in range(2)]


def test_policies_order_on_a_straggler_case():
    cfg = config(prompts_per_step=2, group_size=2, max_envs=4)
    d = device(train_token_s=0.05)   # an update of ~2 x 80 tokens: ~9 s
    run = lambda p: sim.simulate(cfg, None, d, p, updates=6, warmup=2, plans=straggler_plans)
    sync = run(sim.Policy("sync", "sync"))
    partial = run(sim.Policy("partial", "partial", concurrency=8, staleness=2))
    overlap = run(sim.Policy("overlap", "overlap"))
    bigger = run(sim.Policy("P=4", "sync", prompts_per_step=4, concurrency=8))
    assert partial.step_s < 0.75 * sync.step_s           # the straggler no longer holds every update
    assert overlap.step_s < sync.step_s                   # the update hides in the environments' time
    assert bigger.trajectories_per_gpu_hour > 1.5 * sync.trajectories_per_gpu_hour
    assert sync.off_policy_token_share == 0.0 and bigger.off_policy_token_share == 0.0
    assert partial.off_policy_token_share > 0.0 and overlap.off_policy_token_share > 0.0


def test_staleness_bound_holds_updates_back():
    cfg = config(prompts_per_step=2, group_size=2, max_envs=8)
    run = lambda k: sim.simulate(cfg, None, device(train_token_s=0.05), sim.Policy(f"k={k}", "partial",
                                 concurrency=8, staleness=k), updates=6, warmup=2, plans=straggler_plans)
    assert run(1).step_s > run(3).step_s


def test_stale_kv_is_recomputed_after_new_weights():
    """A trajectory in flight across an update prefills its whole context again at its next turn."""
    cfg = config(prompts_per_step=1, group_size=1, max_envs=2)
    long_turns = [sim.Turn(100, 10, 30.0), sim.Turn(10, 10, 0.0)]
    short = [sim.Turn(100, 10, 0.0)]
    plans = lambda step, group: [sim.Plan(0.0, long_turns if group == 0 else short, 0.0)]
    run = sim.Simulation(cfg, None, device(), sim.Policy("partial", "partial", concurrency=2, staleness=2),
                         plans=plans)
    run.run(4)
    first = run.members[0][0]
    assert first.done and first.versions[0] == 10 and sum(first.versions.values()) == 20
    assert first.prefilled == 100 + (10 + 110)   # its prompt; then its new tokens and its 110 stale ones
    assert all(t.prefilled == 100 for g in list(run.members)[1:] for t in run.members[g] if t.done)


def test_paper_setting_inputs_are_sourced():
    w, d = sim.paper_workload("start"), sim.gpu_device()
    for name, dist in vars(w).items():
        if isinstance(dist, sim.Dist):
            assert dist.source, name
    assert "4.8" in d.sources["hbm"] and "0.413" in d.sources["decode_share"]
    # one decode step of one sequence reads the weights: 15.23 GB at 41.3% of 4.8 TB/s
    assert sim.decode_step_s(d, 1, 0) == pytest.approx(15.23e9 / (4.8e12 * 0.413))
    rng = random.Random(0)
    plans = [sim.draw_plan(w, sim.PAPER_CONFIG, rng, 2000) for _ in range(200)]
    assert all(p.tokens <= sim.PAPER_CONFIG.max_context for p in plans)
    assert all(len(p.turns) <= sim.PAPER_CONFIG.max_steps for p in plans)


def test_reports(tmp_path):
    (tmp_path / "grpo_sim_validation.json").write_text(json.dumps({"markdown": "VALIDATION TABLE"}))
    assert sim.main(["--out", str(tmp_path), "--updates", "1", "--policy", "sync (today)"]) == 0
    report = json.loads((tmp_path / "grpo_step_sim.json").read_text())
    assert "SIMULATED" in report["label"]
    rows = report["phases"]["start"]["results"]
    assert [r["policy"] for r in rows] == ["sync (today)"] and rows[0]["speedup"] == 1.0
    assert math.isclose(sum(rows[0][f"busy_{k}"] for k in ("prefill", "decode", "training", "idle")), 1.0,
                        abs_tol=0.01)
    md = (tmp_path / "grpo_step_sim.md").read_text()
    assert "SIMULATED" in md and "VALIDATION TABLE" in md and "| sync (today) |" in md
    assert "ASSUMPTION" in md and "H200" in md
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "grpo_step_sim_start.png").stat().st_size > 1000
