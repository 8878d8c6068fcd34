"""Policies: given the conversation so far, the next assistant message.

    policy.act(messages, conversation, max_new_tokens) -> Turn

`messages` are the {"role", "content"} dicts so far (system, user, then assistant / tool turns);
`conversation` is the incremental engine.chat.Conversation holding their token ids. Text policies
(scripted, Claude) return the assistant's text in the Qwen2.5 tool-call format; token policies also
return the generated token ids and their log-probs, which the trajectory keeps verbatim."""
from __future__ import annotations

import copy
import hashlib
import threading
from dataclasses import dataclass, replace

from protege.engine.chat import ToolCall, ToolCallParseError, format_assistant_body, parse_tool_calls
from protege.rollout.agent import tools
from protege.rewards.patches import hunks, patch_files
from protege.rollout.agent.client import AnthropicClient
from protege.rollout.sampler.sampling import SamplingParams
from protege.rollout.sampler.server import SamplerServer


@dataclass
class Turn:
    text: str                                 # content and tool calls, as the model writes them
    token_ids: list[int] | None = None        # token policies: exactly the generated ids (ending in <|im_end|>)
    logprobs: list[float] | None = None       # their sampled log-probs
    finish_reason: str | None = None          # token policies: the sampler's ("stop", "length", "context limit")


@dataclass
class Step:
    """One scripted turn: a tool call with an optional thought before it, or `raw` text sent as is."""
    tool: str = ""
    arguments: dict | None = None
    thought: str = ""
    raw: str | None = None

    def text(self) -> str:
        if self.raw is not None:
            return self.raw
        return format_assistant_body(self.thought, [ToolCall(self.tool, self.arguments or {})])


class ScriptedPolicy:
    """Replays a list of steps, then submits. Stateful: one instance per trajectory."""

    def __init__(self, steps: list[Step], name: str = "scripted"):
        self.steps, self.name, self._next = list(steps), name, 0

    def act(self, messages: list[dict], conversation, max_new_tokens: int) -> Turn:
        step = self.steps[self._next] if self._next < len(self.steps) else Step(tools.SUBMIT, {})
        self._next += 1
        return Turn(step.text())


def gold_patch_steps(task, test_command: str | None = None, ask_expert: bool = True) -> list[Step]:
    """A script that fixes a task the way a careful agent would, from its gold patch: view each file to
    change, ask the expert, apply each hunk with str_replace (or create a new file), run the tests,
    submit. Used for end-to-end tests and as seed SFT data."""
    fix = hunks(task.patch)
    if not fix:
        raise ValueError(f"task {task.instance_id}: the gold patch has no hunks")
    new_files = {h.path for h in fix if h.old_start == 0}
    steps = [Step(tools.EDITOR, {"command": "view", "path": path}, thought=f"Let me look at {path}.")
             for path in patch_files(task.patch) if path not in new_files]
    if ask_expert:
        steps.append(Step(tools.ASK_EXPERT, {"question": "I have read the files that look relevant. Where exactly "
                                                         "is the bug, and what is wrong there?"}))
    for h in fix:
        if h.path in new_files:
            steps.append(Step(tools.EDITOR, {"command": "create", "path": h.path, "file_text": h.new_text + "\n"},
                              thought=f"{h.path} is missing; I create it."))
        else:
            steps.append(Step(tools.EDITOR, {"command": "str_replace", "path": h.path, "old_str": h.old_text,
                                             "new_str": h.new_text}, thought=f"I fix {h.path}."))
    if test_command:
        steps.append(Step(tools.BASH, {"command": test_command}, thought="Now I run the tests."))
    steps.append(Step(tools.SUBMIT, {}, thought="The fix is in place."))
    return steps


def to_anthropic_messages(messages: list[dict]) -> tuple[str, list[dict]]:
    """Our conversation as Messages-API input: the system prompt, then alternating turns where a turn's single
    tool call becomes a tool_use block and the observation after it the matching tool_result."""
    system, out, pending = messages[0]["content"], [], None
    for i, message in enumerate(messages[1:]):
        if message["role"] == "assistant":
            try:
                content, calls = parse_tool_calls(message["content"])
            except ToolCallParseError:
                content, calls = message["content"], []
            blocks = [{"type": "text", "text": content}] if content.strip() else []
            pending = f"toolu_{i:04d}" if len(calls) == 1 else None
            if pending:
                blocks.append({"type": "tool_use", "id": pending, "name": calls[0].name,
                               "input": calls[0].arguments})
            out.append({"role": "assistant", "content": blocks or [{"type": "text", "text": "(no reply)"}]})
        elif message["role"] == "tool" and pending:
            out.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": pending,
                                                     "content": message["content"]}]})
        else:
            out.append({"role": "user", "content": message["content"]})
    return system, out


ANTHROPIC_TOOLS = [{"name": t["function"]["name"], "description": t["function"]["description"],
                    "input_schema": t["function"]["parameters"]} for t in tools.TOOLS]


class AnthropicPolicy:
    """Claude as the agent (to collect SFT trajectories); its tool_use blocks are written back in the Qwen
    format. Shared by concurrent trajectories; `cost_usd` totals what it spent."""

    def __init__(self, client: AnthropicClient, max_tokens: int = 4096):
        self.client, self.max_tokens = client, max_tokens
        self.name = f"anthropic:{client.model}"
        self.cost_usd, self._lock = 0.0, threading.Lock()

    def act(self, messages: list[dict], conversation, max_new_tokens: int) -> Turn:
        system, history = to_anthropic_messages(messages)
        done = self.client.complete(system, history, max_tokens=min(self.max_tokens, max(1, max_new_tokens)),
                                    tools=ANTHROPIC_TOOLS)
        with self._lock:
            self.cost_usd += done.cost_usd
        return Turn(format_assistant_body(done.text.strip(), done.tool_calls))


class SamplerPolicy:
    """The model being trained, through the in-process sampler, shared by concurrent trajectories.

    A turn's prompt is the Conversation's token ids plus the generation prompt: the previous prompt, the
    tokens the sampler generated, then the new observation's tokens, never a re-render. Every trajectory
    waiting for its model turn decodes in the same batch (rollout.sampler.server). Each turn may generate
    up to the room left in the agent's context (and params.max_tokens); a cut generation ends the run.
    `sampler` is a Sampler or a SamplerServer shared by many policies (one per trajectory, each with its own
    `seed`: turn t is drawn with a seed derived from (seed, t), whatever else runs in the batch)."""

    def __init__(self, sampler, params: SamplingParams = SamplingParams(temperature=1.0), name: str = "sampler",
                 seed: int | None = None):
        self.name, self.seed, self._turn = name, seed, 0
        self.params = replace(params, n=1, logprobs=True, on_context_overflow="finish")
        self._own_server = not isinstance(sampler, SamplerServer)
        self.server = SamplerServer(sampler) if self._own_server else sampler

    def with_seed(self, seed: int) -> SamplerPolicy:
        """This policy (same server, same batch) for one more trajectory, drawing from `seed`."""
        seeded = copy.copy(self)
        seeded.seed, seeded._turn, seeded._own_server = seed, 0, False
        return seeded

    def act(self, messages: list[dict], conversation, max_new_tokens: int) -> Turn:
        prompt = conversation.ids + conversation.generation_prompt
        # <|im_end|> ends a turn whatever EOS ids the sampler has (a base model's config names <|endoftext|>).
        params = replace(self.params, max_tokens=max(1, min(self.params.max_tokens, max_new_tokens)),
                         stop_token_ids=(*self.params.stop_token_ids, conversation.tokenizer.im_end_id))
        if self.seed is not None:
            params = replace(params, seed=derive_seed(self.seed, self._turn))
        self._turn += 1
        completion = self.server.generate(prompt, params)
        if not completion.token_ids:   # the prompt alone fills the sampler's context
            raise ContextFull(f"the prompt of {len(prompt)} tokens leaves no room to generate")
        text = conversation.tokenizer.decode(completion.token_ids, skip_special_tokens=False)
        return Turn(text.removesuffix("<|im_end|>"), list(completion.token_ids), list(completion.logprobs),
                    completion.finish_reason)

    def close(self) -> None:
        """Stop serving once the running requests are done (the sampler can then be released)."""
        if self._own_server:
            self.server.close()


def derive_seed(*parts: int) -> int:
    """A 62-bit seed from integers (run seed, step, task, sample, turn...): the same parts, the same seed, on
    any rank and in any order of completion."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


class ContextFull(Exception):
    """The conversation leaves no room for another model turn."""
