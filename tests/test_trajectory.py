"""Trajectory records: the loss mask covers exactly the policy's tokens (checked against transformers'
apply_chat_template with the Qwen2.5 template and the real vocabulary), JSONL files round-trip, bad files
are refused with the file, line and field named, and the rewards read the record directly."""
import json
from pathlib import Path

from dataclasses import replace

import pytest
import tokenizers
from transformers import PreTrainedTokenizerFast

from protege.engine.chat import QWEN25_CHAT_TEMPLATE, parse_tool_calls
from protege.engine.tokenizer import qwen25_tokenizer
from protege.rollout.agent import tools
from protege.rollout.agent.loop import run_agent
from protege.rollout.agent.oracle import OracleExpert
from protege.rollout.agent.policies import ScriptedPolicy, Step, gold_patch_steps
from protege.rollout.tasks import bundled_tasks
from protege.rollout.agent.trajectory import (SCHEMA_VERSION, Message, Trajectory, TrajectoryWriter, load_trajectories,
                                save_trajectories)

REFERENCE_TEMPLATE = Path("/work/shared/reference/qwen2.5-chat-template.jinja")


@pytest.fixture(scope="module")
def tok():
    return qwen25_tokenizer()


@pytest.fixture(scope="module")
def traj(tok, sandbox_ready):
    """A real trajectory: the gold script plus a malformed turn, run in the sandbox."""
    from protege.rollout.envs.sandbox import SandboxEnvironment
    task = next(t for t in bundled_tasks() if t.instance_id.endswith("roman-1"))
    steps = gold_patch_steps(task, "python3 -m pytest -q -p no:cacheprovider")
    steps.insert(1, Step(raw="Let me think. «Zurück» 😀 <tool_call>\n{not json}\n</tool_call>"))
    env = SandboxEnvironment(task)
    try:
        return run_agent(task, env, ScriptedPolicy(steps), OracleExpert(), tok)
    finally:
        env.close()


@pytest.fixture(scope="module")
def render(tok):
    """transformers' apply_chat_template with the reference Qwen2.5 template: the independent renderer."""
    template = REFERENCE_TEMPLATE.read_text() if REFERENCE_TEMPLATE.exists() else QWEN25_CHAT_TEMPLATE
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_str(tok.backend.to_str()),
                                 chat_template=template)
    return lambda messages, **kw: hf.apply_chat_template(messages, tools=tools.TOOLS, tokenize=False, **kw)


def template_messages(traj: Trajectory) -> list[dict]:
    """The record's messages in the template's form: assistant tool calls as structured tool_calls."""
    out = []
    for m in traj.messages:
        if m.role == "assistant":
            try:
                content, calls = parse_tool_calls(m.content)
            except ValueError:   # a malformed turn: its text is its content
                content, calls = m.content, []
            message = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = [{"function": {"name": c.name, "arguments": c.arguments}} for c in calls]
            out.append(message)
        else:
            out.append({"role": m.role, "content": m.content})
    return out


def test_ids_match_the_template_and_the_mask_covers_exactly_the_policy_tokens(traj, tok, render):
    assert traj.termination == "submitted"
    messages = template_messages(traj)
    assert tok.encode(render(messages)) == traj.input_ids()
    # Independently of engine.chat: the policy's tokens of assistant turn k run from the end of the prompt
    # that asks for it (history + "<|im_start|>assistant\n") to its <|im_end|>, and nothing else is masked.
    expected = [0] * len(traj.input_ids())
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            start = len(tok.encode(render(messages[:k], add_generation_prompt=True)))
            stop = len(tok.encode(render(messages[:k + 1]))) - 1   # drop the "\n" after <|im_end|>
            expected[start:stop] = [1] * (stop - start)
    assert traj.loss_mask() == expected
    assistant = [m for m in traj.messages if m.role == "assistant"]
    assert sum(traj.loss_mask()) == sum(len(tok.encode(m.content)) + 1 for m in assistant)  # + <|im_end|>


def test_jsonl_round_trip(traj, tmp_path):
    path = tmp_path / "t.jsonl"
    other = Trajectory.from_dict(json.loads(json.dumps(traj.to_dict())))
    other.attempt, other.resolved, other.evaluation = 1, True, {"resolved": True, "FAIL_TO_PASS": {"passed": 2}}
    other.messages[2].logprobs = [-0.5] * sum(other.messages[2].loss_mask)
    save_trajectories(path, [traj, other])
    loaded = load_trajectories(path)
    assert loaded == [traj, other]
    assert loaded[0].schema_version == SCHEMA_VERSION
    with TrajectoryWriter(path) as writer:   # appends
        writer.write(traj)
    assert len(load_trajectories(path)) == 3


def test_easy_views_for_rewards_and_training(traj):
    assert traj.commands() == ["python3 -m pytest -q -p no:cacheprovider"]
    [call] = traj.expert_calls
    asked = traj.actions[call.action_index]
    assert asked.tool == tools.ASK_EXPERT and call.step == asked.step
    assert call.observation_tokens > 0 and traj.expert_tokens == call.observation_tokens
    assert traj.policy_tokens == sum(traj.loss_mask()) and traj.total_tokens == len(traj.input_ids())
    assert traj.gold_patch and "roman" in traj.final_patch
    assert all(a.normalized for a in traj.actions)
    from protege.rewards.shaping import Action, RewardConfig, score
    assert traj.resolved is None   # run_agent does not evaluate: scoring it as unresolved would be a lie
    with pytest.raises(ValueError, match="not evaluated"):
        traj.reward_input()
    traj = replace(traj, resolved=False)
    reward_input = traj.reward_input()
    assert isinstance(reward_input.actions[0], Action) and reward_input.resolved is False
    assert [a.tool for a in reward_input.actions] == [a.tool for a in traj.actions]
    breakdown = score(reward_input, RewardConfig())
    assert breakdown.expert_calls == 1 and breakdown.R_loop == 0.0


def line(**overrides) -> str:
    data = {"task_id": "t", "attempt": 0, "policy": "p", "expert": "e", "termination": "submitted",
            "schema_version": SCHEMA_VERSION, "messages": [], "actions": [], "expert_calls": []}
    data.update(overrides)
    return json.dumps(data)


@pytest.mark.parametrize("text,message", [
    ("{not json", r"bad\.jsonl:2: not valid JSON"),
    (line(schema_version=0), r"bad\.jsonl:2: schema_version 0, this code reads 1"),
    (line(termination="crashed"), r"termination 'crashed' is not one of"),
    (line(messages=[{"role": "user", "content": "x", "token_ids": [1, 2], "loss_mask": [0]}]),
     r"messages\[0\]: user message: 2 token ids but 1 loss-mask entries"),
    (line(messages=[{"role": "assistant", "content": "x", "token_ids": [1], "loss_mask": [1], "logprobs": []}]),
     r"messages\[0\]: assistant message: 0 log-probs for 1 generated tokens"),
    (line(actions=[{"step": 0, "tool": "bash", "arguments": {}, "observation": "", "colour": 1}]),
     r"actions\[0\]: unknown field\(s\) \['colour'\]"),
    (line(expert_calls=[{"step": 0}]), r"expert_calls\[0\]: .*missing"),
])
def test_bad_files_are_refused_naming_line_and_field(tmp_path, text, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line() + "\n" + text + "\n")
    with pytest.raises(ValueError, match=message):
        load_trajectories(path)


def test_message_checks_its_lengths():
    with pytest.raises(ValueError, match="3 token ids but 2 loss-mask entries"):
        Message("assistant", "x", [1, 2, 3], [0, 1])
