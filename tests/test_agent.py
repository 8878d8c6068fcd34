"""The agent loop on real environments (bubblewrap sandbox; Docker when available): a scripted policy that
reads, asks the oracle, edits, tests and submits resolves a bundled task; malformed calls, step / context
limits, the expert quota and budget, a failing expert; concurrency; the sampler policy's append-only
prompts; the file editor; the collection CLI (and that the API key is never written)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from protege.engine.config import ModelConfig
from protege.engine.model import Qwen2ForCausalLM
from protege.engine.tokenizer import qwen25_tokenizer, train_bpe_tokenizer
from protege.rollout.agent import tools
from protege.rollout.agent.loop import AgentConfig, Job, run_agent, run_batch
from protege.rollout.agent.client import AnthropicClient, Prices
from protege.rollout.agent.expert import AnthropicExpert
from protege.rollout.agent.oracle import OracleExpert
from protege.rollout.agent.policies import AnthropicPolicy, SamplerPolicy, ScriptedPolicy, Step, gold_patch_steps
from protege.rollout.sampler.sampler import Sampler
from protege.rollout.sampler.sampling import SamplingParams
from protege.rollout.tasks import bundled_tasks
from anthropic_server import AnthropicTestServer, Reply

ROOT = Path(__file__).resolve().parent.parent
FAKE_KEY = "sk-ant-test-FAKE-KEY-9f8e7d6c5b4a"
@pytest.fixture(scope="module")
def tok():
    return qwen25_tokenizer()


@pytest.fixture(scope="module")
def task():
    return next(t for t in bundled_tasks() if t.instance_id.endswith("binary_search-1"))


def sandbox(task):
    from protege.rollout.envs.sandbox import SandboxEnvironment
    return SandboxEnvironment(task)


@pytest.fixture
def env(task, sandbox_ready):
    environment = sandbox(task)
    yield environment
    environment.close()


def scripted(*steps) -> ScriptedPolicy:
    return ScriptedPolicy([s if isinstance(s, Step) else Step(*s) for s in steps])


def bash(command: str) -> Step:
    return Step(tools.BASH, {"command": command})


ASK = Step(tools.ASK_EXPERT, {"question": "Where is the bug?"})


# ------------------------------------------------------------------------------------------ end to end

def check_gold_run(task, env, tok, backend):
    from protege.rollout.evaluate import evaluate_patch
    policy = ScriptedPolicy(gold_patch_steps(task, "python3 -m pytest -q -p no:cacheprovider"))
    traj = run_agent(task, env, policy, OracleExpert(), tok)
    assert traj.termination == "submitted" and traj.error is None
    tools_used = [a.tool for a in traj.actions]
    assert tools_used[0] == tools.EDITOR and tools.ASK_EXPERT in tools_used and tools_used[-1] == tools.SUBMIT
    assert all(a.error is None for a in traj.actions), [a.error for a in traj.actions]
    [call] = traj.expert_calls
    assert call.answer and "search/bisect.py" in call.answer
    assert (call.warranted, call.followed) == (1.0, 1.0)   # asked after looking; then edited the hinted file
    test_run = next(a for a in traj.actions if a.tool == tools.BASH)
    assert test_run.exit_code == 0 and "passed" in test_run.observation
    assert "search/bisect.py" in traj.final_patch
    assert evaluate_patch(task, traj.final_patch, backend=backend).resolved


def test_scripted_gold_run_resolves_a_bundled_task_in_the_sandbox(task, env, tok):
    check_gold_run(task, env, tok, "sandbox")


@pytest.mark.docker
def test_scripted_gold_run_resolves_a_bundled_task_in_docker(task, tok, bundled_images, docker_client):
    from protege.rollout.envs.docker import DockerEnvironment
    with DockerEnvironment(bundled_images[task.instance_id], client=docker_client) as env:
        check_gold_run(task, env, tok, "docker")


# ------------------------------------------------------------------------------------------ the loop's rules

def test_malformed_calls_are_error_observations_and_steps(task, env, tok):
    policy = scripted(
        Step(raw='<tool_call>\n{"name": "bash", "arguments": {"command": "ls"\n</tool_call>'),   # bad JSON
        Step(raw="I think the bug is in bisect.py."),                                            # no call
        Step(raw=f'{tools_text("bash", {"command": "ls"})}\n{tools_text("bash", {"command": "pwd"})}'),  # two
        Step("run_tests", {}),                                                                    # unknown tool
        Step(tools.BASH, {}),                                                                     # no command
        Step(tools.EDITOR, {"command": "str_replace", "path": "search/bisect.py", "old_str": "no such text"}),
        Step(tools.SUBMIT, {"now": True}),                                                        # not a submit
        bash("echo still running"))
    traj = run_agent(task, env, policy, OracleExpert(), tok)
    assert traj.termination == "submitted" and traj.steps == 9
    errors = [a.error for a in traj.actions[:7]]
    assert all(errors), errors
    assert [a.tool for a in traj.actions[:3]] == ["invalid"] * 3
    observations = [m.content for m in traj.messages if m.role == "tool"]
    assert "could not be parsed" in observations[0] and "invalid JSON" in observations[0]
    assert "no tool call" in observations[1] and "2 tool calls" in observations[2]
    assert "Unknown tool 'run_tests'" in observations[3] and "missing required argument(s): command" in observations[4]
    assert "occurs 0 times" in observations[5] and "unknown argument 'now'" in observations[6]
    assert observations[7].startswith("still running")


def tools_text(name, arguments) -> str:
    return Step(name, arguments).text()


def test_nul_in_a_command_or_path_is_an_error_observation_not_the_end(task, env, tok):
    """A NUL (a model may write "\\u0000" in its JSON) cannot reach a process: the call fails, the run goes on."""
    policy = scripted(bash("echo a\0b"), Step(tools.EDITOR, {"command": "view", "path": "search\0x"}),
                      bash("echo alive"))
    traj = run_agent(task, env, policy, OracleExpert(), tok, AgentConfig(judge=False))
    assert traj.termination == "submitted" and traj.error is None
    assert ["NUL character" in (a.error or "") for a in traj.actions] == [True, True, False, False]
    assert traj.actions[2].observation == "alive\n"


def test_max_steps(task, env, tok):
    traj = run_agent(task, env, scripted(*[bash("ls")] * 10), OracleExpert(), tok, AgentConfig(max_steps=3))
    assert traj.termination == "max_steps" and traj.steps == 3 and len(traj.actions) == 3
    assert traj.infrastructure_error is None   # the policy's own ending


def test_infrastructure_failures_are_recorded_as_such(task, tok, server, sandbox_ready):
    """The environment that does not start, the evaluator that raises, the judge that cannot be reached: each
    is recorded on the trajectory as the infrastructure's failure; a bad call, a loop, its own command's timeout
    are the policy's (None)."""
    def no_env(task):
        raise RuntimeError("image missing")

    def broken_evaluator(task, patch):
        raise OSError("evaluation container died")

    [start] = run_batch([Job(task, scripted())], no_env, OracleExpert(), tok, evaluate=lambda t, p: {"resolved": 1})
    assert start.termination == "error" and start.resolved is False
    assert start.infrastructure_error == "environment start: RuntimeError: image missing"
    def own():   # a bad call, the same command looping into its timeout, an edit (a patch to evaluate)
        return scripted(("not_a_tool", {}), *[bash("sleep 5")] * 3,
                        Step(tools.EDITOR, {"command": "create", "path": "search/new.py", "file_text": "x = 1\n"}))

    [evaluated] = run_batch([Job(task, own())], sandbox, OracleExpert(), tok, AgentConfig(command_timeout_s=0.2),
                            evaluate=broken_evaluator)
    assert evaluated.termination == "submitted" and evaluated.resolved is False
    assert evaluated.infrastructure_error == "evaluator: OSError: evaluation container died"
    [ok] = run_batch([Job(task, own())], sandbox, OracleExpert(), tok, AgentConfig(command_timeout_s=0.2),
                     evaluate=lambda t, p: {"resolved": False})
    assert [a.exit_code for a in ok.actions[1:4]] == [124] * 3 and ok.actions[0].error is not None
    assert ok.infrastructure_error is None   # a bad call, a loop, its own command's timeouts: the policy's
    server.script(Reply(text="hint"), *[Reply(status=529)] * 3)   # the answer, then the judge unreachable
    env = sandbox(task)
    try:
        judged = run_agent(task, env, scripted(ASK), anthropic_expert(server, max_retries=2), tok)
    finally:
        env.close()
    assert judged.termination == "submitted" and judged.expert_calls[0].judge_fallback
    assert judged.infrastructure_error.startswith("judge: judge unavailable:")


def test_context_limit(task, env, tok):
    config = AgentConfig(max_context_tokens=1400)   # the system and task turns take about 1,000 tokens
    traj = run_agent(task, env, scripted(*[bash("seq 1 100")] * 20), OracleExpert(), tok, config)
    assert traj.termination == "context" and 0 < traj.steps < 20
    assert len(traj.input_ids()) >= 1400 - 200


def test_long_observations_keep_head_and_tail(task, env, tok):
    traj = run_agent(task, env, scripted(bash("seq 1 20000")), OracleExpert(), tok,
                     AgentConfig(max_observation_chars=2000))
    observation = traj.messages[3].content   # system, user, assistant, tool
    assert len(observation) < 2100 and observation.startswith("1\n2\n3\n") and observation.endswith("19999\n20000\n")
    assert "characters omitted" in observation
    assert traj.actions[0].observation == observation  # the record keeps what the agent was shown


def test_expert_quota_refuses_extra_calls(task, env, tok):
    policy = scripted(ASK, bash("ls"), ASK, bash("ls"), ASK)
    traj = run_agent(task, env, policy, OracleExpert(), tok, AgentConfig(expert_quota=2))
    assert traj.termination == "submitted"
    assert [c.refused for c in traj.expert_calls] == [False, False, True]
    assert traj.expert_calls[2].answer is None
    assert "quota of 2 calls" in traj.actions[4].observation
    # Only answered calls bring expert tokens into the context (the expert's share of the tokens).
    tool_messages = [m for m in traj.messages if m.role == "tool"]
    assert [c.observation_tokens for c in traj.expert_calls] == [len(tool_messages[0].token_ids),
                                                                  len(tool_messages[2].token_ids), 0]
    assert traj.expert_tokens == sum(len(tool_messages[i].token_ids) for i in (0, 2))


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", FAKE_KEY)
    with AnthropicTestServer(default_text="Check the loop bound in find().") as s:
        yield s


def anthropic_expert(server, **kw) -> AnthropicExpert:
    client = AnthropicClient("claude-test", base_url=server.base_url, backoff_s=0.01,
                             prices=kw.pop("prices", Prices(3.0, 15.0)), **kw)
    return AnthropicExpert(client)


def test_expert_budget_ends_the_run(task, env, tok, server):
    # $1 a call: 100k input tokens at $10/M.
    server.script(*[Reply(text="hint", input_tokens=100_000, output_tokens=0)] * 3)
    expert = anthropic_expert(server, prices=Prices(10.0, 0.0))
    traj = run_agent(task, env, scripted(ASK, bash("ls"), ASK, bash("ls"), ASK), expert, tok,
                     AgentConfig(expert_budget_usd=2.0, judge=False))
    assert traj.termination == "budget" and traj.steps == 3
    assert traj.expert_cost_usd == pytest.approx(2.0) and len(server.requests) == 2


def test_failed_expert_call_is_recorded_and_the_run_goes_on(task, env, tok, server):
    server.script(*[Reply(status=500)] * 3)
    traj = run_agent(task, env, scripted(ASK, bash("echo after")), anthropic_expert(server, max_retries=2), tok,
                     AgentConfig(judge=False))
    assert traj.termination == "submitted" and traj.steps == 3
    [call] = traj.expert_calls
    assert call.answer is None and call.retries == 2 and "HTTP 500" in call.error
    assert call.observation_tokens == 0 and traj.expert_tokens == 0   # the failure note is not expert output
    assert traj.actions[0].observation.startswith("ask_expert failed:")
    assert traj.actions[1].observation.startswith("after")
    # The expert's API failed, not the policy: GRPO leaves the trajectory out, reports count it apart.
    assert traj.infrastructure_error.startswith("expert: ") and "HTTP 500" in traj.infrastructure_error


def test_judge_sees_each_calls_segment_only(task, env, tok, server):
    judged, asked = [], []

    def respond(body):
        if "You review how" not in body["system"]:
            asked.append(body["messages"][0]["content"].split("<recent_messages>")[1].split("</recent_messages>")[0])
            return Reply(text="a hint")
        judged.append(body["messages"][0]["content"].split("<agent_after_the_guidance>")[1])
        return Reply(text='{"warranted": 1, "followed": 0.5}' if len(judged) == 1 else "no idea")

    server.responder = respond
    traj = run_agent(task, env, scripted(ASK, bash("echo first-segment"), ASK, bash("echo second-segment")),
                     anthropic_expert(server), tok)
    # The expert sees the last 5 messages: for the second call, from the first question to the second.
    headers = [line for line in asked[1].splitlines() if line.startswith("[")]
    assert headers == ["[assistant]", "[tool]", "[assistant]", "[tool]", "[assistant]"]
    assert "a hint" in asked[1] and "first-segment" in asked[1] and "Where is the bug?" in asked[1]
    assert "first-segment" in judged[0] and "second-segment" not in judged[0]
    assert "second-segment" in judged[1] and "first-segment" not in judged[1]
    first, second = traj.expert_calls
    assert (first.warranted, first.followed, first.judge_fallback) == (1.0, 0.5, False)
    assert (second.warranted, second.followed, second.judge_fallback) == (None, None, True)
    assert "not JSON" in second.judge_note and second.judge_cost_usd > 0


def test_command_timeout(task, env, tok):
    traj = run_agent(task, env, scripted(bash("echo begun; sleep 30"), bash("echo alive")), OracleExpert(), tok,
                     AgentConfig(command_timeout_s=0.5))
    slow, after = traj.actions[:2]
    assert slow.exit_code == 124 and "begun" in slow.observation and "timed out after 0.5 s" in slow.observation
    assert after.observation.startswith("alive")


def test_anthropic_policy_drives_the_loop_through_tool_use(task, env, tok, server):
    server.script(Reply(text="Let me look.", tool_uses=[("bash", {"command": "ls search"})], output_tokens=30),
                  Reply(tool_uses=[("submit", {})], output_tokens=10))
    policy = AnthropicPolicy(AnthropicClient("claude-agent", base_url=server.base_url, prices=Prices(3.0, 15.0)))
    traj = run_agent(task, env, policy, OracleExpert(), tok)
    assert traj.termination == "submitted" and [a.tool for a in traj.actions] == ["bash", "submit"]
    assert "bisect.py" in traj.actions[0].observation
    assert traj.messages[2].content == 'Let me look.\n<tool_call>\n{"name": "bash", "arguments": {"command": ' \
                                       '"ls search"}}\n</tool_call>'
    first, second = (r["body"] for r in server.requests)
    assert {t["name"] for t in first["tools"]} == {"bash", "str_replace_editor", "submit", "ask_expert"}
    assert first["system"] == traj.messages[0].content and len(first["messages"]) == 1
    assistant, result = second["messages"][1:]
    [use] = [b for b in assistant["content"] if b["type"] == "tool_use"]
    assert use["name"] == "bash" and use["input"] == {"command": "ls search"}
    [block] = result["content"]
    assert block["type"] == "tool_result" and block["tool_use_id"] == use["id"] and "bisect.py" in block["content"]
    assert policy.cost_usd == pytest.approx(2 * 100 * 3e-6 + 40 * 15e-6)


# ------------------------------------------------------------------------------------------ concurrency

def test_trajectories_run_concurrently(task, tok, sandbox_ready):
    def job():
        return Job(task, scripted(bash("sleep 2 && echo slept")))

    start = time.perf_counter()
    [single] = run_batch([job()], sandbox, OracleExpert(), tok, AgentConfig(judge=False))
    single_time = time.perf_counter() - start
    start = time.perf_counter()
    batch = run_batch([job() for _ in range(8)], sandbox, OracleExpert(), tok, AgentConfig(judge=False),
                      concurrency=8)
    batch_time = time.perf_counter() - start
    assert all(t.termination == "submitted" and t.actions[0].observation.startswith("slept")
               for t in [single] + batch)
    assert batch_time < 2 * single_time, (batch_time, single_time)


# ------------------------------------------------------------------------------------------ sampler policy

def im_end_model(tokenizer, token: int | None = None) -> Qwen2ForCausalLM:
    """A real model rigged so that greedy decoding always emits <|im_end|> (or `token`): with the attention and
    MLP outputs zeroed the last hidden state is the (all-ones) embedding, and only that token's head row is
    non-zero."""
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.im_end_id if token is None else token] = 1.0
    return model


def test_a_turn_ending_in_endoftext_ends_the_run_as_eos_not_context(task, env, tmp_path):
    tokenizer = train_bpe_tokenizer(["find the index of the target in the sorted list"] * 4, 400, tmp_path)
    sampler = Sampler(im_end_model(tokenizer, tokenizer.endoftext_id), num_blocks=256,
                      eos_token_ids=tokenizer.eos_ids)
    policy = SamplerPolicy(sampler, SamplingParams(temperature=0))
    try:
        traj = run_agent(task, env, policy, OracleExpert(), tokenizer, AgentConfig(max_steps=3, judge=False))
    finally:
        policy.close()
    assert traj.termination == "eos" and traj.steps == 1 and traj.error is None
    last = traj.messages[-1]
    assert last.token_ids[-1] == tokenizer.endoftext_id and last.loss_mask.count(1) == 1


def test_a_turn_cut_by_max_turn_tokens_is_its_own_termination_not_context(task, env, tmp_path):
    """A generation cut by the per-turn cap with room left ends the run as max_turn_tokens; one cut because
    the context is full ends it as context."""
    tokenizer = train_bpe_tokenizer(["find the index of the target in the sorted list"] * 4, 400, tmp_path)
    sampler = Sampler(im_end_model(tokenizer, tokenizer.encode("find")[0]), num_blocks=256,
                      eos_token_ids=tokenizer.eos_ids)   # never ends a turn
    policy = SamplerPolicy(sampler, SamplingParams(temperature=0, max_tokens=4))
    try:
        capped = run_agent(task, env, policy, OracleExpert(), tokenizer, AgentConfig(max_steps=3, judge=False))
        prompt = len(capped.input_ids()) - 4   # the system and task turns and the generation prompt
        full = run_agent(task, env, policy, OracleExpert(), tokenizer,
                         AgentConfig(max_steps=3, max_context_tokens=prompt + 2, judge=False))
    finally:
        policy.close()
    assert capped.termination == "max_turn_tokens" and capped.steps == 1 and capped.error is None
    assert capped.messages[-1].loss_mask.count(1) == 4
    assert full.termination == "context" and full.steps == 1 and full.messages[-1].loss_mask.count(1) == 2


def test_a_failing_sampler_step_fails_its_turns_and_leaves_the_sampler_usable(task, env, tmp_path):
    tokenizer = train_bpe_tokenizer(["find the index of the target in the sorted list"] * 4, 400, tmp_path)

    class FailsOnce(Sampler):
        failed = False

        def step(self):
            if not self.failed:
                self.failed = True
                super().step()   # half a step's work done, then the failure
                raise RuntimeError("device lost")
            return super().step()

    sampler = FailsOnce(im_end_model(tokenizer), num_blocks=256, eos_token_ids=tokenizer.eos_ids)
    policy = SamplerPolicy(sampler, SamplingParams(temperature=0))
    try:
        failed = run_agent(task, env, policy, OracleExpert(), tokenizer, AgentConfig(max_steps=2, judge=False))
        assert failed.termination == "error" and "device lost" in failed.error
        assert failed.infrastructure_error.startswith("sampler: sampler step failed: RuntimeError: device lost")
        assert not sampler.has_unfinished()
        sampler.release()                 # raised "requests are still running" before
        sampler.new_weight_version()
        ok = run_agent(task, env, policy, OracleExpert(), tokenizer, AgentConfig(max_steps=2, judge=False))
    finally:
        policy.close()
    assert ok.termination == "max_steps" and ok.steps == 2 and ok.infrastructure_error is None


def test_sampler_policy_prompts_are_append_only(task, env, tmp_path):
    tokenizer = train_bpe_tokenizer(["find the index of the target in the sorted list"] * 4, 400, tmp_path)
    prompts = []

    class RecordingSampler(Sampler):
        def add_request(self, prompt_ids, params=None):
            prompts.append(list(prompt_ids))
            return super().add_request(prompt_ids, params)

    sampler = RecordingSampler(im_end_model(tokenizer), num_blocks=256, eos_token_ids=tokenizer.eos_ids)
    policy = SamplerPolicy(sampler, SamplingParams(temperature=0))
    try:
        traj = run_agent(task, env, policy, OracleExpert(), tokenizer, AgentConfig(max_steps=3))
    finally:
        policy.close()
    assert traj.termination == "max_steps" and traj.steps == 3
    assistant = [m for m in traj.messages if m.role == "assistant"]
    assert all(m.token_ids[-2:] == [tokenizer.im_end_id, tokenizer.encode("\n")[0]] for m in assistant)
    assert all(m.loss_mask.count(1) == 1 and len(m.logprobs) == 1 for m in assistant)
    ids = traj.input_ids()
    for k, prompt in enumerate(prompts):
        assert ids[:len(prompt)] == prompt                       # every prompt is a prefix of the final ids
        assert prompt[-3:] == tokenizer.encode("<|im_start|>assistant\n")[-3:]
        if k:
            previous = prompts[k - 1]
            assert prompt[:len(previous) + 1] == previous + [tokenizer.im_end_id]   # + what was generated
    assert sampler.stats.cached_tokens > 0                       # and the prefix cache served them


def test_sampler_policy_turns_end_at_im_end_whatever_the_samplers_eos(task, env, tmp_path):
    """A sampler built with the model config's EOS (a base model's: <|endoftext|>) must still end each
    assistant turn at <|im_end|>, not run on to max_tokens and cut the run short."""
    tokenizer = train_bpe_tokenizer(["find the index of the target in the sorted list"] * 4, 400, tmp_path)
    sampler = Sampler(im_end_model(tokenizer), num_blocks=256, eos_token_ids=[tokenizer.endoftext_id])
    policy = SamplerPolicy(sampler, SamplingParams(temperature=0, max_tokens=8))
    try:
        traj = run_agent(task, env, policy, OracleExpert(), tokenizer, AgentConfig(max_steps=2))
    finally:
        policy.close()
    assert traj.termination == "max_steps" and traj.steps == 2
    assert all(m.token_ids[-2:] == [tokenizer.im_end_id, tokenizer.encode("\n")[0]] and m.loss_mask.count(1) == 1
               for m in traj.messages if m.role == "assistant")


def test_collect_cli_with_the_sampler_policy(tmp_path, sandbox_ready):
    from protege.rollout.collect import main
    from protege.rollout.agent.trajectory import load_trajectories
    checkpoint = tmp_path / "model"
    tokenizer = train_bpe_tokenizer(["find the index of the target in the sorted list"] * 4, 400, checkpoint)
    im_end_model(tokenizer).save_pretrained(checkpoint)
    out = tmp_path / "out"
    assert main(["--tasks", str(ROOT / "data/tasks/instances.jsonl"), "--policy", "sampler", "--checkpoint",
                 str(checkpoint), "--temperature", "0", "--kv-cache-gb", "0.002", "--limit", "1", "--attempts", "2",
                 "--max-steps", "2", "--out", str(out), "--backend", "sandbox"]) == 0
    trajectories = load_trajectories(out / "trajectories.jsonl")
    assert [t.termination for t in trajectories] == ["max_steps"] * 2
    assert all(t.resolved is False and t.final_patch == "" for t in trajectories)   # nothing was changed
    assert all(m.logprobs == [pytest.approx(0.0, abs=1e-6)] for t in trajectories for m in t.messages
               if m.role == "assistant")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resolve_rate"] == 0.0 and summary["steps_mean"] == 2 and summary["termination"] == {"max_steps": 2}


# ------------------------------------------------------------------------------------------ file editor

def test_file_editor_operations(env):
    view = tools.run_editor(env, {"command": "view", "path": "search/bisect.py", "view_range": [1, 2]})
    source = env.read_file("search/bisect.py").splitlines()
    assert view.splitlines()[1:] == [f"     1\t{source[0]}", f"     2\t{source[1]}"]
    listing = tools.run_editor(env, {"command": "view", "path": "."})
    assert "search/bisect.py" in listing and ".git" not in listing
    tools.run_editor(env, {"command": "create", "path": "notes/new.txt", "file_text": "a\nc\n"})
    tools.run_editor(env, {"command": "insert", "path": "notes/new.txt", "insert_line": 1, "insert_text": "b"})
    tools.run_editor(env, {"command": "insert", "path": "notes/new.txt", "insert_line": 0, "insert_text": "top\n"})
    tools.run_editor(env, {"command": "str_replace", "path": "notes/new.txt", "old_str": "c\n", "new_str": "C!\n"})
    assert env.read_file("notes/new.txt") == "top\na\nb\nC!\n"
    assert env.run("cat notes/new.txt").output == "top\na\nb\nC!\n"   # written inside the environment
    for arguments, message in [
        ({"command": "create", "path": "notes/new.txt", "file_text": "x"}, "already exists"),
        ({"command": "view", "path": "missing.py"}, "does not exist"),
        ({"command": "str_replace", "path": "notes/new.txt", "old_str": "\n"}, "occurs 4 times"),
        ({"command": "insert", "path": "notes/new.txt", "insert_line": 9, "insert_text": "x"}, "out of range"),
        ({"command": "view", "path": "notes/new.txt", "view_range": [3, 9]}, "Invalid view_range"),
        ({"command": "str_replace", "path": "search", "old_str": "x"}, "is a directory"),
    ]:
        with pytest.raises(tools.ToolError, match=message):
            tools.run_editor(env, arguments)


def test_validate_call_names_the_problem():
    with pytest.raises(tools.ToolError, match="must be of type integer"):
        tools.validate_call(tools.EDITOR, {"command": "insert", "path": "a", "insert_line": "3", "insert_text": ""})
    with pytest.raises(tools.ToolError, match="must be one of"):
        tools.validate_call(tools.EDITOR, {"command": "delete", "path": "a"})
    with pytest.raises(tools.ToolError, match="unknown argument 'cwd'"):
        tools.validate_call(tools.BASH, {"command": "ls", "cwd": "/"})
    with pytest.raises(tools.ToolError, match="missing required argument.*file_text"):
        tools.validate_call(tools.EDITOR, {"command": "create", "path": "a"})
    tools.validate_call(tools.SUBMIT, {})


@pytest.mark.parametrize("field,value", [("max_steps", 0), ("max_context_tokens", 1.5), ("expert_quota", -1),
                                         ("expert_budget_usd", 0), ("command_timeout_s", "60")])
def test_agent_config_refuses_bad_limits(field, value):
    with pytest.raises(ValueError, match=f"AgentConfig.{field}="):
        AgentConfig(**{field: value})


def test_truncate_keeps_head_and_tail():
    text = "".join(f"{i:05d}\n" for i in range(1000))
    cut = tools.truncate(text, 600)
    assert cut.startswith(text[:300]) and cut.endswith(text[-300:]) and "5400 characters omitted" in cut
    assert tools.truncate("short", 600) == "short"


# ------------------------------------------------------------------------------------------ collection CLI

def test_collect_cli_scripted_with_the_anthropic_expert_never_writes_the_key(tmp_path, sandbox_ready):
    def respond(body):   # the hidden judge gets scores, the expert a hint
        if "You review how" in body["system"]:
            return Reply(text='{"warranted": 0.9, "followed": 0.75}')
        return Reply(text="The bug is in the loop bound.")

    with AnthropicTestServer(responder=respond) as server:
        out = tmp_path / "out"
        env = {**os.environ, "ANTHROPIC_API_KEY": FAKE_KEY}
        command = [sys.executable, "-m", "protege.rollout.collect", "--tasks", str(ROOT / "data/tasks/instances.jsonl"),
                   "--policy", "scripted", "--expert", "anthropic", "--anthropic-base-url", server.base_url,
                   "--attempts", "2", "--limit", "2", "--out", str(out), "--backend", "sandbox",
                   "--concurrency", "4", "--keep-resolved"]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trajectories"] == 4 and summary["tasks"] == 2
    assert summary["resolve_rate"] == 1.0 and summary["termination"] == {"submitted": 4}
    assert summary["expert_calls_per_task"] == 1.0 and 0 < summary["expert_token_share"] < 0.2
    assert summary["loop_rate"] == 0.0 and summary["written"] == 4
    from protege.rollout.agent.trajectory import load_trajectories
    trajectories = load_trajectories(out / "trajectories.jsonl")
    assert len(trajectories) == 4 and all(t.resolved for t in trajectories)
    assert all(t.expert_calls[0].answer == "The bug is in the loop bound." for t in trajectories)
    assert all((c.warranted, c.followed, c.judge_fallback) == (0.9, 0.75, False)
               for t in trajectories for c in t.expert_calls)
    for path in out.rglob("*"):
        if path.is_file():
            assert FAKE_KEY not in path.read_text(errors="replace"), path
    assert FAKE_KEY not in done.stdout + done.stderr
