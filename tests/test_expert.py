"""The experts: the real anthropic client against a local Messages-API server (success, 429 then success,
a 500 storm past the retry budget, non-retryable errors, cost accounting, the gold-patch note), the hidden
judge's strict parsing and fallback, and the offline oracle (hints that never leak the fix)."""
from dataclasses import dataclass

import pytest

from protege.rewards.patches import hunks, patch_files
from protege.rollout.agent.client import AnthropicClient, Prices
from protege.rollout.agent.expert import AnthropicExpert
from protege.rollout.agent.judge import JudgeCase, parse_judge
from protege.rollout.agent.oracle import OracleExpert
from protege.rollout.agent.trajectory import Action
from anthropic_server import AnthropicTestServer, Reply

FAKE_KEY = "sk-ant-test-FAKE-KEY-0123456789abcdef"

GOLD = """diff --git a/pkg/calc.py b/pkg/calc.py
index 1111111..2222222 100644
--- a/pkg/calc.py
+++ b/pkg/calc.py
@@ -10,7 +10,7 @@ def helper():
 
 
 def add(a, b):
-    return a - b
+    return a + b
 
 
 def mul(a, b):
@@ -20,3 +20,4 @@ def mul(a, b):
 def clamp(x, lo, hi):
     # keep x within bounds
-    --- not a header ---
+    +++ not a header either +++
+    return max(lo, min(x, hi))
diff --git a/pkg/new.py b/pkg/new.py
new file mode 100644
--- /dev/null
+++ b/pkg/new.py
@@ -0,0 +1,2 @@
+VALUE = 1
+OTHER = 2
"""


@dataclass
class FakeTask:
    instance_id: str = "calc-1"
    problem_statement: str = "add(2, 3) returns -1."
    patch: str = GOLD


@pytest.fixture
def server():
    with AnthropicTestServer(default_text="Check the sign in add().") as s:
        yield s


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", FAKE_KEY)


def client(server, **kw) -> AnthropicClient:
    kw.setdefault("backoff_s", 0.01)
    return AnthropicClient("claude-test", base_url=server.base_url, prices=Prices(3.0, 15.0), **kw)


RECENT = [{"role": "user", "content": f"message {i}"} for i in range(5)]


def test_ask_success_sends_issue_recent_question_and_accounts_cost(server, key):
    server.script(Reply(text="Look at add() in pkg/calc.py.", input_tokens=1200, output_tokens=80))
    reply = AnthropicExpert(client(server)).ask(FakeTask(), RECENT, "Where is the bug?")
    assert reply.error is None and reply.retries == 0
    assert reply.guidance == "Look at add() in pkg/calc.py."
    assert reply.observation == "<guidance>\nLook at add() in pkg/calc.py.\n</guidance>"
    assert (reply.input_tokens, reply.output_tokens) == (1200, 80)
    assert reply.cost_usd == pytest.approx(1200 * 3.0 / 1e6 + 80 * 15.0 / 1e6)
    [request] = server.requests
    assert request["path"] == "/v1/messages"
    headers = request["headers"]   # the key goes out as x-api-key or (newer SDKs) a bearer token
    assert FAKE_KEY in (headers.get("x-api-key"), headers.get("authorization", "").removeprefix("Bearer "))
    body = request["body"]
    assert body["model"] == "claude-test"
    prompt = body["messages"][0]["content"]
    assert "add(2, 3) returns -1." in prompt and "Where is the bug?" in prompt
    assert all(f"message {i}" in prompt for i in range(5))
    assert "reference_patch" not in body["system"]   # the gold patch only when asked for


def test_gold_patch_shown_with_a_do_not_reveal_note(server, key):
    AnthropicExpert(client(server), show_gold_patch=True).ask(FakeTask(), RECENT, "Where?")
    system = server.requests[0]["body"]["system"]
    assert "return a + b" in system and "Never reveal" in system


def test_rate_limit_then_success_is_retried(server, key):
    server.script(Reply(status=429, headers={"retry-after": "0"}), Reply(text="ok"))
    reply = AnthropicExpert(client(server, max_retries=3)).ask(FakeTask(), RECENT, "q")
    assert reply.error is None and reply.guidance == "ok"
    assert reply.retries == 1 and len(server.requests) == 2


def test_timeout_is_retried(server, key):
    server.script(Reply(text="too late", delay_s=1.0), Reply(text="in time"))
    reply = AnthropicExpert(client(server, max_retries=2, timeout_s=0.3)).ask(FakeTask(), RECENT, "q")
    assert reply.error is None and reply.guidance == "in time" and reply.retries == 1


def test_500_storm_beyond_the_retry_budget_fails_clearly(server, key):
    server.script(*[Reply(status=500)] * 10)
    reply = AnthropicExpert(client(server, max_retries=2)).ask(FakeTask(), RECENT, "q")
    assert len(server.requests) == 3            # the first try and 2 retries, no more
    assert reply.guidance is None and reply.retries == 2 and reply.cost_usd == 0
    assert "HTTP 500" in reply.error and "gave up after 2 retries" in reply.error
    assert reply.observation.startswith("ask_expert failed:")


def test_non_retryable_error_fails_at_once(server, key):
    server.script(Reply(status=401), Reply(text="never reached"))
    reply = AnthropicExpert(client(server, max_retries=3)).ask(FakeTask(), RECENT, "q")
    assert len(server.requests) == 1 and reply.retries == 0
    assert "HTTP 401" in reply.error and FAKE_KEY not in reply.error


def test_missing_key_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(ValueError, match="ANTHROPIC_API_KEY"):
        AnthropicClient("claude-test", base_url="http://127.0.0.1:9")


def case(**kw) -> JudgeCase:
    fields = dict(question="Where?", guidance="In add().", context=RECENT, segment=[{"role": "assistant",
                  "content": "editing"}], segment_actions=[], previous_tool="bash", repo_dir="/testbed")
    fields.update(kw)
    return JudgeCase(**fields)


def test_judge_through_the_server(server, key):
    server.script(Reply(text='{"warranted": 0.8, "followed": 0.25}', input_tokens=500, output_tokens=12))
    scores = AnthropicExpert(client(server)).judge(FakeTask(), case())
    assert (scores.warranted, scores.followed, scores.fallback) == (0.8, 0.25, False)
    assert scores.cost_usd == pytest.approx(500 * 3e-6 + 12 * 15e-6)
    prompt = server.requests[0]["body"]["messages"][0]["content"]
    assert "In add()." in prompt and "editing" in prompt


def test_judge_unreachable_falls_back(server, key):
    server.script(*[Reply(status=503)] * 3)
    scores = AnthropicExpert(client(server, max_retries=1)).judge(FakeTask(), case())
    assert scores.fallback and scores.warranted is None and scores.followed is None
    assert "unavailable" in scores.note


@pytest.mark.parametrize("text,expected", [
    ('{"warranted": 1, "followed": 0}', (1.0, 0.0)),
    ('```json\n{"warranted": 0.5, "followed": 0.75}\n```', (0.5, 0.75)),
    ('{"followed": 0.1, "warranted": 0.9}', (0.9, 0.1)),
])
def test_parse_judge_accepts_exact_json(text, expected):
    scores = parse_judge(text)
    assert not scores.fallback and (scores.warranted, scores.followed) == expected


@pytest.mark.parametrize("text,why", [
    ("warranted: 1, followed: 0", "not JSON"),
    ('Sure! {"warranted": 1, "followed": 0}', "not JSON"),
    ('{"warranted": 1}', "exactly the keys"),
    ('{"warranted": 1, "followed": 0, "note": "x"}', "exactly the keys"),
    ('{"warranted": 1.5, "followed": 0}', "in [0, 1]"),
    ('{"warranted": true, "followed": 0}', "in [0, 1]"),
    ('{"warranted": "0.5", "followed": 0}', "in [0, 1]"),
    ('[0.5, 0.5]', "exactly the keys"),
])
def test_parse_judge_rejects_anything_else(text, why):
    scores = parse_judge(text)
    assert scores.fallback and scores.warranted is None and scores.followed is None and why in scores.note


def test_parse_patch_reads_hunks_by_their_counts():
    fix = hunks(GOLD)
    assert [(h.path, h.old_start) for h in fix] == [("pkg/calc.py", 10), ("pkg/calc.py", 20), ("pkg/new.py", 0)]
    assert fix[0].first_changed_line == 13 and fix[0].context == "def helper():"
    assert fix[1].removed == ["    --- not a header ---"]
    assert fix[1].added == ["    +++ not a header either +++", "    return max(lo, min(x, hi))"]
    assert fix[2].new_text == "VALUE = 1\nOTHER = 2"
    assert patch_files(GOLD) == ["pkg/calc.py", "pkg/new.py"]
    with pytest.raises(ValueError, match="cut short"):
        hunks(GOLD[:GOLD.index("+VALUE")])


def test_oracle_hint_points_at_the_bug_without_the_fix():
    reply = OracleExpert().ask(FakeTask(), RECENT, "Where is the bug?")
    assert reply.error is None and reply.cost_usd == 0
    text = reply.observation
    assert text.startswith("<guidance>") and text.endswith("</guidance>")
    assert "pkg/calc.py around line 13" in text and "return a - b" in text and "pkg/new.py" in text
    added = [line[1:].strip() for line in GOLD.splitlines() if line.startswith("+") and not line.startswith("+++ ")]
    assert added and not any(line in text for line in added)


def test_oracle_judge_heuristic():
    oracle, task = OracleExpert(), FakeTask()
    edit = Action(step=3, tool="str_replace_editor", observation="edited",
                  arguments={"command": "str_replace", "path": "/testbed/pkg/calc.py", "old_str": "a", "new_str": "b"})
    view = Action(step=4, tool="str_replace_editor", arguments={"command": "view", "path": "pkg/new.py"},
                  observation="viewed")
    scores = oracle.judge(task, case(segment_actions=[edit, view]))
    assert (scores.warranted, scores.followed) == (1.0, 0.5)        # one of the two hinted files edited
    assert oracle.judge(task, case(previous_tool="ask_expert")).warranted == 0.0   # back to back
    assert oracle.judge(task, case(previous_tool=None)).warranted == 0.5           # asked before looking
    assert oracle.judge(task, case(segment_actions=[view])).followed == 0.0
