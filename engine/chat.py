"""Qwen2.5 ChatML / function-calling format: conversations -> token ids + loss mask, append-only; tool-call parsing.

Token-exact with the Qwen2.5-Instruct template (QWEN25_CHAT_TEMPLATE), except on purpose:
- only the template's structure is special tokens (<|im_start|>, <|im_end|>, <tool_call> tags); all contents
  are plain text (Tokenizer.encode_text), so a file holding "<|im_end|>" cannot forge a turn;
- every turn is tokenised on its own, and an assistant body apart from its generation prompt (as the sampler
  produced it), so rendering is append-only and multi-turn RL never re-tokenises. Consecutive tool results
  are one group (append_tool_results), as the template merges them into one turn.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from protege.engine.tokenizer import IM_END, TOOL_CALL_END, TOOL_CALL_START, Tokenizer

DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
TOOLS_PREAMBLE = ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                  "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_POSTAMBLE = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                   "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
                   "\"arguments\": <args-json-object>}\n</tool_call>")
TOOL_CALL_TAGS = re.compile(f"({re.escape(TOOL_CALL_START)}|{re.escape(TOOL_CALL_END)})")

# Qwen2.5-Instruct's chat template, verbatim from its tokenizer_config.json (Qwen's data, Apache-2.0): written
# into saved checkpoints so that transformers and other servers format chats as the model was trained.
QWEN25_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict


class ToolCallParseError(ValueError):
    """Generated text holds a malformed <tool_call> block; the message says which call and what is wrong."""


def to_json(value) -> str:
    """JSON exactly as the template's `tojson` filter writes it (transformers: ensure_ascii=False, ", " and ": "
    separators, keys in insertion order)."""
    return json.dumps(value, ensure_ascii=False)


def format_tool_call(call: ToolCall) -> str:
    """One call in the template's form; the name is written raw, so it must not need JSON escaping."""
    return f'{TOOL_CALL_START}\n{{"name": "{call.name}", "arguments": {to_json(call.arguments)}}}\n{TOOL_CALL_END}'


def format_assistant_body(content: str, tool_calls: list[ToolCall]) -> str:
    """What the assistant writes after "<|im_start|>assistant\\n", up to (not including) <|im_end|>."""
    return "\n".join(([content] if content else []) + [format_tool_call(c) for c in tool_calls])


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """Split an assistant's generated text (without its closing <|im_end|>) into content and tool calls: the
    inverse of format_assistant_body. Calls must come after the content, separated only by whitespace."""
    first = text.find(TOOL_CALL_START)
    if first < 0:
        if TOOL_CALL_END in text:
            raise ToolCallParseError(f"{TOOL_CALL_END} without an opening {TOOL_CALL_START}")
        return text, []
    content = text[:first].removesuffix("\n")
    calls: list[ToolCall] = []
    rest = text[first:]
    while rest:
        index = len(calls)
        if not rest.startswith(TOOL_CALL_START):
            raise ToolCallParseError(f"text after tool call {index - 1}, where only more tool calls may follow: "
                                     f"{_snippet(rest)}")
        end = rest.find(TOOL_CALL_END)
        body = rest[len(TOOL_CALL_START):] if end < 0 else rest[len(TOOL_CALL_START):end]
        if end < 0 or TOOL_CALL_START in body:
            raise ToolCallParseError(f"tool call {index}: {TOOL_CALL_START} is not closed by {TOOL_CALL_END}")
        calls.append(_parse_call(body, index))
        rest = rest[end + len(TOOL_CALL_END):].lstrip()
    return content, calls


def _parse_call(body: str, index: int) -> ToolCall:
    body = body.strip()
    try:
        call = json.loads(body)
    except json.JSONDecodeError as e:
        raise ToolCallParseError(f"tool call {index}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno}): "
                                 f"{_snippet(body)}") from None
    if not isinstance(call, dict):
        raise ToolCallParseError(f"tool call {index}: expected a JSON object, got {type(call).__name__}")
    name = call.get("name")
    if not isinstance(name, str) or not name:
        raise ToolCallParseError(f"tool call {index}: missing 'name' (a non-empty string): {_snippet(body)}")
    if "arguments" not in call:
        raise ToolCallParseError(f"tool call {index} ({name}): missing 'arguments'")
    if not isinstance(call["arguments"], dict):
        raise ToolCallParseError(f"tool call {index} ({name}): 'arguments' must be a JSON object, "
                                 f"got {type(call['arguments']).__name__}")
    extra = sorted(set(call) - {"name", "arguments"})
    if extra:
        raise ToolCallParseError(f"tool call {index} ({name}): unexpected keys {extra}")
    return ToolCall(name, call["arguments"])


def _snippet(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


class Conversation:
    """Incremental renderer: each append returns the new token ids and loss mask, which extend `ids`/`mask`.

    Messages are OpenAI-style dicts: {"role": "system"|"user"|"assistant"|"tool", "content": str}; an assistant
    message may carry "tool_calls": [{"function": {"name", "arguments": dict}}] (or {"name", "arguments"}) and
    "token_ids": the exact tokens a policy generated, used verbatim. token_ids that do not end with <|im_end|>
    (a truncated generation) end the conversation. With tools (JSON schemas), they are described in the system
    turn; without a leading system message the template's default system prompt is used.
    """

    def __init__(self, tokenizer: Tokenizer, tools: list[dict] | None = None):
        self.tokenizer = tokenizer
        # list() of a dict or a string would silently render its keys or characters as tool schemas
        if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
            raise ValueError(f"tools must be a list of JSON-schema objects (dicts), got {_snippet(repr(tools))}")
        self.tools = list(tools or [])
        self.ids: list[int] = []
        self.mask: list[int] = []
        self._tags = {tag: tokenizer.token_id(tag) for tag in (TOOL_CALL_START, TOOL_CALL_END)}
        self.generation_prompt: list[int] = self._encode(tokenizer.im_start_id, "assistant\n")
        self._newline = tokenizer.encode_text("\n")
        self._n_messages = 0
        self._last_role: str | None = None
        self._ended = False

    def append(self, message: dict) -> tuple[list[int], list[int]]:
        """Render one message (a tool result counts as a group of one)."""
        if not isinstance(message, dict):
            raise ValueError(f"message {self._n_messages}: expected a dict, got {type(message).__name__}")
        role = message.get("role")
        if role == "tool":
            return self.append_tool_results([message])
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message {self._n_messages}: unknown role {role!r} "
                             f"(expected system, user, assistant or tool)")
        self._check_open(role)
        ids, mask = self._system_prefix(message)
        if role == "assistant":
            body, ended = self._assistant_body(message)
            ids += self.generation_prompt + body
            mask += [0] * len(self.generation_prompt) + [1] * len(body)
            if not ended:
                ids += self._newline
                mask += [0] * len(self._newline)
            self._ended = ended
        elif not (role == "system" and self._n_messages == 0):  # a leading system message is the system turn
            ids += self._encode_turn(role, self._content(message))
            mask += [0] * (len(ids) - len(mask))
        return self._extend(ids, mask, 1, role)

    def append_tool_results(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """Render the results of one assistant turn's tool calls: one user turn of <tool_response> blocks."""
        self._check_open("tool")
        if not messages:
            raise ValueError(f"message {self._n_messages}: empty group of tool results")
        if self._last_role == "tool":
            raise ValueError(f"message {self._n_messages}: tool result right after a group of tool results; append "
                             f"all results of a turn together with append_tool_results (the template merges them)")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") != "tool":
                got = f"role {message.get('role')!r}" if isinstance(message, dict) else repr(message)
                raise ValueError(f"message {self._n_messages + i}: expected a tool result, got {got}")
        ids, mask = self._system_prefix(messages[0])
        text = "user" + "".join(f"\n<tool_response>\n{self._content(m, self._n_messages + i)}\n</tool_response>"
                               for i, m in enumerate(messages))
        ids += self._encode(self.tokenizer.im_start_id, text, self.tokenizer.im_end_id, "\n")
        mask += [0] * (len(ids) - len(mask))
        return self._extend(ids, mask, len(messages), "tool")

    def _check_open(self, role) -> None:
        if self._ended:
            raise ValueError(f"message {self._n_messages} ({role}): the conversation ended with an assistant turn "
                             f"whose token_ids do not end with {IM_END}")

    def _extend(self, ids: list[int], mask: list[int], n_messages: int, role: str) -> tuple[list[int], list[int]]:
        self.ids += ids
        self.mask += mask
        self._n_messages += n_messages
        self._last_role = role
        return ids, mask

    def _system_prefix(self, message: dict) -> tuple[list[int], list[int]]:
        """The system turn, rendered before the first message (from it when it is a system message)."""
        if self._n_messages > 0:
            return [], []
        system = self._content(message) if message.get("role") == "system" else DEFAULT_SYSTEM_PROMPT
        if not self.tools:
            ids = self._encode_turn("system", system)
        else:
            tools = TOOLS_PREAMBLE + "".join("\n" + to_json(tool) for tool in self.tools)
            ids = self._encode(self.tokenizer.im_start_id, f"system\n{system}{tools}",
                               *self._with_tags(TOOLS_POSTAMBLE), self.tokenizer.im_end_id, "\n")
        return ids, [0] * len(ids)

    def _encode_turn(self, role: str, content: str) -> list[int]:
        return self._encode(self.tokenizer.im_start_id, f"{role}\n{content}", self.tokenizer.im_end_id, "\n")

    def _encode(self, *parts: str | int) -> list[int]:
        """Ids of structural tokens (ints, kept) and text (str, plain: special strings in it are characters).
        Adjacent texts are joined before encoding, as in the template's string, which the tokenizer splits
        only at added tokens: so the ids equal the template's wherever the texts hold no special string."""
        ids, text = [], ""
        for part in parts:
            if isinstance(part, str):
                text += part
            else:
                ids += self.tokenizer.encode_text(text) + [part]
                text = ""
        return ids + self.tokenizer.encode_text(text)

    def _with_tags(self, text: str) -> list[str | int]:
        """`text` cut at its <tool_call>/</tool_call> tags, which become their token ids."""
        return [self._tags.get(piece, piece) for piece in TOOL_CALL_TAGS.split(text) if piece]

    def _content(self, message: dict, index: int | None = None) -> str:
        content = message.get("content")
        if content is None:
            return ""
        if not isinstance(content, str):
            index = self._n_messages if index is None else index
            raise ValueError(f"message {index} ({message.get('role')}): content must be a string, "
                             f"got {type(content).__name__}")
        return content

    def _assistant_body(self, message: dict) -> tuple[list[int], bool]:
        """The assistant's tokens after the generation prompt, through <|im_end|>; and whether they end the
        conversation (verbatim token_ids cut short of <|im_end|>)."""
        where = f"message {self._n_messages} (assistant)"
        token_ids = message.get("token_ids")
        if token_ids is not None:
            token_ids = list(token_ids)
            bad = [t for t in token_ids if type(t) is not int or not 0 <= t < self.tokenizer.vocab_size]  # no bools
            if not token_ids or bad:
                raise ValueError(f"{where}: token_ids must be a non-empty list of ids in [0, "
                                 f"{self.tokenizer.vocab_size}); bad: {bad[:5]}")
            return token_ids, token_ids[-1] != self.tokenizer.im_end_id
        calls = [self._tool_call(call, where) for call in message.get("tool_calls") or []]
        body = format_assistant_body(self._content(message), calls)
        return self._encode(*self._with_tags(body), self.tokenizer.im_end_id), False

    @staticmethod
    def _tool_call(call: dict, where: str) -> ToolCall:
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise ValueError(f"{where}: a tool call must be a dict, got {call!r}")
        name, arguments = function.get("name"), function.get("arguments")
        if not isinstance(name, str) or not name or json.dumps(name)[1:-1] != name:
            raise ValueError(f"{where}: tool call name must be a non-empty string needing no JSON escaping, "
                             f"got {name!r}")
        if not isinstance(arguments, dict):
            raise ValueError(f"{where}: tool call {name!r}: arguments must be a dict, got {type(arguments).__name__}")
        return ToolCall(name, arguments)


def render(tokenizer: Tokenizer, messages: list[dict], tools: list[dict] | None = None,
           add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids and loss mask of a whole conversation (consecutive tool results form one group)."""
    conversation = Conversation(tokenizer, tools)
    i = 0
    while i < len(messages):
        if isinstance(messages[i], dict) and messages[i].get("role") == "tool":
            j = i
            while j < len(messages) and isinstance(messages[j], dict) and messages[j].get("role") == "tool":
                j += 1
            conversation.append_tool_results(messages[i:j])
            i = j
        else:
            conversation.append(messages[i])
            i += 1
    if add_generation_prompt:
        return (conversation.ids + conversation.generation_prompt,
                conversation.mask + [0] * len(conversation.generation_prompt))
    return conversation.ids, conversation.mask
