"""Shaped rewards: every expected value below is worked out by hand from the formulas in method.md."""
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protege.rewards.curriculum import Curriculum
from protege.rewards.normalize import NAVIGATION, normalize_action, normalize_command, streaks
from protege.rewards.shaping import (Action, ExpertCall, RewardConfig, RewardInput, action_streaks, gate, loop_penalty,
                                     loop_reward, score)
from protege.rewards.similarity import changed_lines, patch_similarity
from protege.rewards.stats import aggregate

STAGE_I = Curriculum.default().stage_at(1).reward
STAGE_II = Curriculum.default().stage_at(81).reward


def commands_with_streaks(lengths):
    # Distinct classes per run: make0, make1, ... (all normalise to different bases).
    return [f"tool{j} --flag {i}" for j, n in enumerate(lengths) for i in range(n)]


def bash(commands):
    return [Action("bash", {"command": c}) for c in commands]


# ---------------------------------------------------------------- normalisation

@pytest.mark.parametrize("command, expected", [
    ("PYTHONPATH=. DEBUG=1 python -m pytest tests/test_x.py", "python -m pytest"),  # env prefix
    ("A=1 make", "make"),
    ("cd /testbed && git status", "git status"),          # chain: last command
    ("ls; python run.py", "python"),
    ("cd src\npython3 setup.py build", "python"),           # newline chains too; python3 is python
    ("python -m pytest -q tests | tail -n 20", "python -m pytest"),   # pipe: first command of the pipeline
    ("cat setup.py | grep version", NAVIGATION),
    ("echo 'a && b; c' | wc", "echo"),                     # && and ; inside quotes do not split
    ('git commit -m "fix && test; done"', "git commit"),
    ("git diff HEAD~1", "git diff"),                        # two-word bases
    ("git -C /testbed --no-pager log -3", "git log"),
    ("pip install -e .", "pip install"),
    ("pip3 install requests", "pip install"),
    ("python -m pip install x", "python -m pip"),
    ("/usr/bin/python3.11 x.py", "python"),
    ("(cd pkg && sed -i s/a/b/ f.py)", "sed"),             # subshell
    ("grep -rn 'def f' .", NAVIGATION),                     # navigation class
    ("find . -name '*.py'", NAVIGATION),
    ("ls -la src", NAVIGATION),
    ("", "<empty>"),
])
def test_normalize_command(command, expected):
    assert normalize_command(command) == expected


def test_unparsable_is_its_own_class_never_an_exception():
    a = normalize_command('echo "unterminated')
    b = normalize_command("grep 'oops")
    assert a.startswith("<unparsable>") and b.startswith("<unparsable>")
    assert a != b and a != normalize_command("echo ok")
    assert normalize_command('echo "unterminated') == a  # the same text is the same class
    assert streaks(['echo "x', 'echo "x', "echo fine"]) == [2, 1]


def test_editor_actions():
    assert normalize_action("str_replace_editor", {"command": "view", "path": "a.py"}) == NAVIGATION
    assert normalize_action("str_replace_editor", {"command": "view", "path": "a.py"}) == normalize_command("ls")
    edit_a = normalize_action("str_replace_editor", {"command": "str_replace", "path": "a.py"})
    assert edit_a == normalize_action("str_replace_editor", {"command": "str_replace", "path": "a.py",
                                                             "old_str": "x", "new_str": "y"})
    assert edit_a != normalize_action("str_replace_editor", {"command": "str_replace", "path": "b.py"})
    assert edit_a != normalize_action("str_replace_editor", {"command": "insert", "path": "a.py"})
    assert normalize_action("bash", {"command": "X=1 git status"}) == "git status"
    assert normalize_action("ask_expert", {"question": "?"}) == "ask_expert"


def test_streaks():
    assert streaks([]) == []
    assert streaks(["ls", "grep x .", "find .", "make", "make -j2", "cd a && make", "pytest"]) == [3, 3, 1]


# ---------------------------------------------------------------- R_loop

@pytest.mark.parametrize("lengths, expected", [
    ([3, 20, 9], -0.5 * (0 + 13 + 2)),       # the example: -7.5
    ([14], 0.0),                              # first streak under k1 = 15
    ([15], -0.5 * 1),                         # s1 - k1 + 1 = 1
    ([20], -0.5 * 6),
    ([10, 8, 12], -0.5 * (0 + 1 + 5)),        # first under k1, later ones over k2 = 8
    ([7, 7, 7], 0.0),                         # later streaks under k2
    ([40, 30], -10.0),                        # -0.5 * (26 + 23) = -24.5, capped at -10
    ([], 0.0),                                # the empty trajectory
])
def test_loop_penalty_by_hand(lengths, expected):
    assert loop_penalty(bash(commands_with_streaks(lengths))) == pytest.approx(expected)
    assert streaks(commands_with_streaks(lengths)) == lengths


def test_loop_penalty_counts_every_action_as_the_method_does():
    # The method's runs are over normalised actions: an editor view is navigation like grep and find, so
    # these 16 actions are one streak (-0.5 * (16 - 15 + 1) = -1); counting bash commands only would see a
    # streak of 8 greps and no penalty.
    view = Action("str_replace_editor", {"command": "view", "path": "a.py"})
    actions = (bash(["grep -n x a.py"] * 4) + [view] * 4) * 2
    assert action_streaks(actions) == [16]
    assert loop_penalty(actions) == -1.0
    assert score(RewardInput(actions, [], resolved=True), STAGE_I).R_loop == loop_penalty(actions)


def test_loop_penalty_parameters():
    # k1=5, k2=3, lam=1, cap=-4: [6, 4] -> -(2 + 2) = -4 ; [6, 5] -> -(2 + 3) = -5 -> cap -4
    assert loop_penalty(bash(commands_with_streaks([6, 4])), k1=5, k2=3, lam=1.0, cap=-4.0) == -4.0
    assert loop_penalty(bash(commands_with_streaks([6, 2])), k1=5, k2=3, lam=1.0, cap=-4.0) == -2.0


# ---------------------------------------------------------------- similarity

GOLD = """diff --git a/pkg/core.py b/pkg/core.py
index 3f1e2a1..8b2c9d0 100644
--- a/pkg/core.py
+++ b/pkg/core.py
@@ -10,3 +10,3 @@ def total(items):
     s = 0
-    for i in range(len(items) - 1):
+    for i in range(len(items)):
         s += items[i]
"""


def test_similarity_ignores_headers_and_whitespace():
    same_change = """diff --git a/pkg/core.py b/pkg/core.py
index aaaaaaa..bbbbbbb 100755
--- a/pkg/core.py
+++ b/pkg/core.py
@@ -9,5 +9,5 @@
 def total(items):
     s = 0
-    for i in range(len(items)  -  1):
+    for i in range(len(items)):
         s += items[i]
-  return s
+    return s
"""
    # Other index/hunk lines, internal whitespace, and a whitespace-only re-indent: the same change.
    assert patch_similarity(same_change, GOLD) == 1.0
    assert patch_similarity("", GOLD) == 0.0
    assert patch_similarity("", "") == 1.0


def test_similarity_partial_by_hand():
    half = GOLD.replace("+    for i in range(len(items)):", "+    for i in range(len(items) + 0):")
    # changed lines: gold {-a, +b}, model {-a, +c}: Dice = 2*1 / (2+2) = 0.5
    assert patch_similarity(half, GOLD) == pytest.approx(0.5)
    more = half.replace("@@ -10,3 +10,3 @@ def total(items):", "@@ -10,3 +10,4 @@").replace(
        "         s += items[i]", "+    pass\n         s += items[i]")
    # model {-a, +c, +d} vs gold {-a, +b}: 2*1 / (3+2) = 0.4
    assert patch_similarity(more, GOLD) == pytest.approx(0.4)


def test_removed_line_starting_with_dashes_is_content():
    patch = "--- a/q.sql\n+++ b/q.sql\n@@ -1,2 +1,2 @@\n select 1;\n--- old\n+-- new\n"
    assert changed_lines(patch) == {("q.sql", "-", "-- old"): 1, ("q.sql", "+", "-- new"): 1}


# ---------------------------------------------------------------- gates, stages, R_total

@pytest.mark.parametrize("value, expected", [(-1.999, 1.0), (-2.0, 0.5), (-4.999, 0.5), (-5.0, 0.0), (-9, 0.0)])
def test_loop_gate_boundaries(value, expected):
    assert gate(value, -2.0, -5.0) == expected


def act(tool, **arguments):
    return Action(tool, arguments)


def example_trajectory():
    """3 navigation actions, a call, 10 pytest runs, an edit, two back-to-back calls, submit."""
    actions = [act("bash", command="grep -rn foo ."), act("bash", command="find . -name x"),
               act("str_replace_editor", command="view", path="a.py"), act("ask_expert", question="?")]
    actions += [act("bash", command="python -m pytest -q")] * 10
    actions += [act("str_replace_editor", command="str_replace", path="a.py"), act("ask_expert", question="?"),
                act("ask_expert", question="?"), act("submit")]
    calls = [ExpertCall(3, warranted=0.9, followed=0.8), ExpertCall(15, warranted=0.3, followed=0.2),
             ExpertCall(16, warranted=0.6, followed=0.7)]
    wrong = GOLD.replace("+    for i in range(len(items)):", "+    for i in range(3):").replace(
        "-    for i in range(len(items) - 1):", "-    s = 0\n+    s = 1")
    return RewardInput(actions, calls, resolved=False, patch=wrong, gold_patch=GOLD)


def test_same_trajectory_under_both_stages_by_hand():
    traj = example_trajectory()
    # Streaks [3, 1, 10, 1, 2, 1]: R_loop = -0.5 * (0 + 0 + 3 + 0 + 0 + 0) = -1.5 -> g_loop = 1.
    # Warrant: phi = 0.9, -1 (0.3 < 0.5), 0.6 -> mean 0.5/3; b2b: one pair -> -0.5; no quota.
    r_expert = 0.5 / 3 - 0.5
    # Unresolved and dissimilar (similarity < 0.5): R_sim = -1.
    r_other = 0 + 0.5 * -1 + 0.3 * r_expert
    one = score(traj, STAGE_I, "I")
    assert one.streaks == [3, 1, 10, 1, 2, 1]
    assert one.R_loop == pytest.approx(-1.5) and one.g_loop == 1.0
    assert one.R_expert == pytest.approx(r_expert) and one.R_b2b == -0.5 and one.back_to_back == 1
    assert one.R_sim == -1.0 and one.R_other == pytest.approx(r_other)
    # Stage I: psi(f) = 0.8, -1, 0.7 (tau 0.5, low -1) -> 0.5/3; w_follow 0.2; g_follow = 1.
    assert one.R_follow == pytest.approx(0.5 / 3) and one.g_follow == 1.0
    assert one.R_total == pytest.approx(-1.5 + 0.2 * 0.5 / 3 + r_other)
    # Stage II: psi(f) = 0.8, -2, 0.7 -> -0.5/3 (> b1 = -0.5 -> g_follow = 1); w_follow 2.
    two = Curriculum.default().score(traj, step=81)
    assert two.stage == "II"
    assert two.R_follow == pytest.approx(-0.5 / 3) and two.g_follow == 1.0
    assert two.R_total == pytest.approx(-1.5 + 2.0 * (-0.5 / 3) + r_other)


def calls_with_follow(scores, n_actions=20):
    return RewardInput([act("bash", command=f"cmd{i}") for i in range(n_actions)],
                       [ExpertCall(i, warranted=1.0, followed=f) for i, f in enumerate(scores)], resolved=True)


@pytest.mark.parametrize("follow_scores, r_follow, g_follow", [
    ([0.0, 1.0], (-2 + 1) / 2, 0.5),                  # exactly b1 = -0.5 -> 0.5
    ([0.0, 0.5, 0.5], (-2 + 0.5 + 0.5) / 3, 1.0),     # -1/3 > b1 -> 1
    ([0.0, 0.0, 0.0, 0.0, 0.5], (-8 + 0.5) / 5, 0.0), # exactly b2 = -1.5 -> 0
    ([0.0, 0.0, 0.0, 1.0], (-6 + 1) / 4, 0.5),
])
def test_follow_gate_boundaries_stage_two(follow_scores, r_follow, g_follow):
    b = score(calls_with_follow(follow_scores), STAGE_II, "II")
    assert b.R_follow == pytest.approx(r_follow) and b.g_follow == g_follow
    # resolved, no loops, every call warranted: R_other = 1 + 0.3 * 1
    assert b.R_total == pytest.approx(0 + 2.0 * r_follow + g_follow * 1.3)
    assert score(calls_with_follow(follow_scores), STAGE_I, "I").g_follow == 1.0  # no follow gate in Stage I


def test_loop_gate_in_total():
    # A first streak of 18 -> R_loop = -0.5 * 4 = -2 -> g_loop = 0.5; of 24 -> -5 -> g_loop = 0.
    for n, r_loop, g in [(18, -2.0, 0.5), (24, -5.0, 0.0)]:
        traj = RewardInput([act("bash", command="make")] * n, [], resolved=True)
        b = score(traj, STAGE_I, "I")
        assert (b.R_loop, b.g_loop) == (r_loop, g)
        assert b.R_total == pytest.approx(r_loop + g * 1.0)  # R_other = 1 (resolved, no calls)


def test_no_expert_call_rule():
    traj = RewardInput([act("bash", command="make"), act("submit")], [], resolved=True)
    assert score(traj, STAGE_I).R_total == pytest.approx(1.0)
    b = score(traj, STAGE_II)
    assert b.R_no_call == -10.0 and b.R_total == pytest.approx(1.0 - 10.0)


def test_terminal_and_refused_calls():
    # The last call is the final action: nothing follows it, so it is left out of R_follow.
    actions = [act("ask_expert"), act("bash", command="make"), act("ask_expert")]
    calls = [ExpertCall(0, 1.0, 0.9), ExpertCall(2, 1.0, 0.0)]
    assert score(RewardInput(actions, calls, resolved=True), STAGE_II).R_follow == pytest.approx(0.9)
    # A call refused over the quota: R_quota = -0.5 and it counts in neither mean.
    calls = [ExpertCall(0, 1.0, 1.0), ExpertCall(2, None, None, refused=True)]
    b = score(RewardInput(actions, calls, resolved=True), STAGE_I)
    assert b.R_quota == -0.5 and b.R_warrant == 1.0 and b.expert_calls == 1


# ---------------------------------------------------------------- curriculum and config

def test_curriculum_stage_at():
    c = Curriculum.default()
    assert [c.stage_at(s).name for s in (1, 80, 81, 160, 500)] == ["I", "I", "II", "II", "II"]
    with pytest.raises(ValueError, match="before the first stage"):
        c.stage_at(0)
    assert STAGE_II.w_follow == 2.0 and STAGE_II.p_follow_low == -2.0 and STAGE_II.follow_gate
    assert STAGE_I.w_follow == 0.2 and not STAGE_I.follow_gate and STAGE_I.no_call_penalty is None


def test_curriculum_from_config_and_rescore():
    c = Curriculum.from_dict({"base": {"k1": 10}, "stages": [
        {"name": "warmup", "first_step": 1, "last_step": 5, "reward": {"w_follow": 0.0}},
        {"name": "main", "first_step": 6, "last_step": 9, "reward": {"follow_gate": True}}]})
    assert c.stage_at(5).reward.k1 == 10 and c.stage_at(7).name == "main"
    traj = example_trajectory()
    again = c.rescore([traj], "warmup")[0]
    assert again.stage == "warmup" and again.R_total == score(traj, c.stage_at(1).reward).R_total
    with pytest.raises(ValueError, match="unknown key"):
        Curriculum.from_dict({"base": {"k_1": 3}})
    with pytest.raises(ValueError, match="contiguous"):
        Curriculum.from_dict({"stages": [{"name": "a", "first_step": 1, "last_step": 3},
                                         {"name": "b", "first_step": 5, "last_step": 9}]})
    with pytest.raises(ValueError, match="no stage named"):
        c.rescore([traj], "III")
    with pytest.raises(ValueError, match="a2 <= a1"):
        RewardConfig(a1=-5.0, a2=-2.0)


def test_aggregate():
    looping = score(RewardInput([act("bash", command="make")] * 11, [], resolved=False), STAGE_I)
    fine = score(calls_with_follow([1.0, 0.0]), STAGE_II)
    ten = score(RewardInput([act("bash", command="make")] * 10, [], resolved=True), STAGE_I)
    out = aggregate([looping, fine, ten], expert_tokens=[0, 30, 0], total_tokens=[100, 100, 100])
    assert out["loop_rate"] == pytest.approx(1 / 3)          # 11 > 10 loops, 10 does not
    assert out["resolve_rate"] == pytest.approx(2 / 3)
    assert out["expert_calls_per_traj"] == pytest.approx(2 / 3)
    assert out["follow_rate"] == pytest.approx(1 / 2)
    assert out["expert_token_share"] == pytest.approx(0.1)
    assert out["mean_R_total"] == pytest.approx((looping.R_total + fine.R_total + ten.R_total) / 3)


# ---------------------------------------------------------------- properties

streak_lists = st.lists(st.integers(min_value=1, max_value=60), max_size=12)


@given(streak_lists)
def test_loop_reward_bounded(lengths):
    r = loop_reward(lengths)
    assert -10.0 <= r <= 0.0


@given(streak_lists.filter(bool), st.data())
def test_adding_a_repeat_never_raises_loop_reward(lengths, data):
    j = data.draw(st.integers(min_value=0, max_value=len(lengths) - 1))
    longer = list(lengths)
    longer[j] += 1
    assert loop_reward(longer) <= loop_reward(lengths)
    cmds = commands_with_streaks(lengths)
    cmds_longer = commands_with_streaks(longer)
    assert loop_penalty(bash(cmds_longer)) <= loop_penalty(bash(cmds))


tools = st.sampled_from(["bash", "ask_expert", "str_replace_editor", "submit"])
unit = st.floats(min_value=0.0, max_value=1.0)


@st.composite
def trajectories(draw):
    n = draw(st.integers(min_value=0, max_value=40))
    actions = []
    for _ in range(n):
        tool = draw(tools)
        if tool == "bash":
            actions.append(act("bash", command=draw(st.sampled_from(["make", "ls", "python -m pytest", "git diff"]))))
        elif tool == "str_replace_editor":
            actions.append(act(tool, command=draw(st.sampled_from(["view", "str_replace"])), path="a.py"))
        else:
            actions.append(act(tool))
    calls = [ExpertCall(i, draw(unit), draw(unit), refused=draw(st.booleans()))
             for i, a in enumerate(actions) if a.tool == "ask_expert"]
    return RewardInput(actions, calls, resolved=draw(st.booleans()),
                       patch=draw(st.sampled_from(["", GOLD])), gold_patch=GOLD)


@settings(max_examples=200, deadline=None)
@given(trajectories())
def test_ideal_trajectory_is_the_maximum(traj):
    ideal_actions = [act("bash", command="ls"), act("ask_expert"), act("str_replace_editor",
                     command="str_replace", path="a.py"), act("bash", command="python -m pytest"), act("submit")]
    ideal = RewardInput(ideal_actions, [ExpertCall(1, 1.0, 1.0)], resolved=True, patch=GOLD, gold_patch=GOLD)
    # Max by hand: R_loop 0 + w_follow * 1 + 1 * 1 * (1 + 0 + w_expert * (1 + 0 + 0)).
    for cfg, best in [(STAGE_I, 0.2 + 1 + 0.3), (STAGE_II, 2.0 + 1 + 0.3)]:
        assert score(ideal, cfg).R_total == pytest.approx(best)
        assert score(traj, cfg).R_total <= best + 1e-12
        assert math.isfinite(score(traj, cfg).R_total)


def test_an_unevaluated_trajectory_is_not_scored_as_unresolved():
    with pytest.raises(ValueError, match="resolved must be True or False, got None"):
        RewardInput([], [], resolved=None)
