"""The expert behind ask_expert, and the hidden judge that scores each call afterwards.

AnthropicExpert asks Claude through the anthropic SDK (model, base_url and prices from config; the key
only from the ANTHROPIC_API_KEY environment variable, never logged or written). OracleExpert needs no
network: it derives a hint from the task's gold patch (where to look and what is wrong there, never the
fix) and judges with a deterministic heuristic; it is the offline default.

The judge gives, per call, warranted (was asking justified, 0..1) and followed (did the agent act on the
guidance, 0..1) over the agent's segment from the guidance to the next call or the end. Its reply must
be exactly a JSON object {"warranted": x, "followed": y} with numbers in [0, 1]; anything else -- or a
judge that cannot be reached -- gives the fallback: both scores None (the reward treats the call as
unscored) with fallback=True and a note saying why."""
from __future__ import annotations

import json
import os
import random
import re
import time
from dataclasses import dataclass, field

import anthropic

from engine.chat import ToolCall
from rollout.tools import truncate

API_KEY_ENV = "ANTHROPIC_API_KEY"
GUIDANCE_OPEN, GUIDANCE_CLOSE = "<guidance>", "</guidance>"


@dataclass(frozen=True)
class Prices:
    """US dollars per million tokens (defaults: Claude Sonnet list prices)."""
    input_per_mtok: float = 3.0
    output_per_mtok: float = 15.0

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok) / 1e6


@dataclass
class Completion:
    text: str
    input_tokens: int
    output_tokens: int
    cost_usd: float
    retries: int
    tool_calls: list[ToolCall] = field(default_factory=list)   # tool_use blocks, in order


class ExpertUnavailable(Exception):
    """The model could not be reached (retries exhausted or a non-retryable error)."""

    def __init__(self, message: str, retries: int):
        super().__init__(message)
        self.retries = retries


@dataclass
class ExpertReply:
    """An answered (or failed) ask_expert call: `observation` is what the agent sees."""
    observation: str
    guidance: str | None = None        # the expert's answer; None when the call failed
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    retries: int = 0
    error: str | None = None


@dataclass
class JudgeCase:
    """What the hidden judge sees of one expert call."""
    question: str
    guidance: str
    context: list[dict]             # the messages the expert was shown ({"role", "content"})
    segment: list[dict]             # the agent's messages from the guidance to the next call or the end
    segment_actions: list = field(default_factory=list)   # trajectory.Action records of that segment
    previous_tool: str | None = None   # tool of the action just before the call (None: it came first)
    repo_dir: str = ""                 # the repository root, to read absolute paths in the agent's actions


@dataclass
class JudgeScores:
    warranted: float | None
    followed: float | None
    fallback: bool = False
    note: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0


def wrap_guidance(text: str) -> str:
    return f"{GUIDANCE_OPEN}\n{text.strip()}\n{GUIDANCE_CLOSE}"


def failed_reply(error: str, retries: int = 0) -> ExpertReply:
    return ExpertReply(observation=f"ask_expert failed: {error}. Continue on your own.", retries=retries,
                       error=error)


def format_messages(messages: list[dict], limit: int = 4000) -> str:
    """Messages as plain text for a prompt, each cut to `limit` characters (head and tail)."""
    return "\n\n".join(f"[{m['role']}]\n{truncate(m['content'], limit)}" for m in messages)


class AnthropicClient:
    """The Messages API with our own retry loop (SDK retries off, so retries are counted and bounded):
    exponential backoff, or the server's retry-after when it sends one, on 408/429/5xx, timeouts and
    connection errors; other errors fail at once. Thread-safe (the SDK's HTTP client is)."""

    RETRYABLE = (anthropic.RateLimitError, anthropic.InternalServerError, anthropic.RequestTimeoutError,
                 anthropic.APIConnectionError)  # APITimeoutError is an APIConnectionError

    def __init__(self, model: str, base_url: str | None = None, prices: Prices = Prices(), max_retries: int = 4,
                 backoff_s: float = 1.0, max_backoff_s: float = 30.0, timeout_s: float = 120.0,
                 max_tokens: int = 2048):
        self._key = os.environ.get(API_KEY_ENV, "")
        if not self._key:
            raise ValueError(f"the Anthropic expert/policy needs the {API_KEY_ENV} environment variable")
        self.model, self.prices, self.max_retries, self.max_tokens = model, prices, max_retries, max_tokens
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self._client = anthropic.Anthropic(api_key=self._key, base_url=base_url, max_retries=0, timeout=timeout_s)

    def _describe(self, error: Exception) -> str:
        status = getattr(error, "status_code", None)
        text = f"{type(error).__name__}" + (f" (HTTP {status})" if status else "") + f": {error}"
        return text.replace(self._key, "[redacted]")[:500]

    def _delay(self, attempt: int, error: Exception) -> float:
        response = getattr(error, "response", None)
        retry_after = response.headers.get("retry-after") if response is not None else None
        try:
            return min(self.max_backoff_s, float(retry_after))
        except (TypeError, ValueError):
            return min(self.max_backoff_s, self.backoff_s * 2 ** attempt * (0.5 + random.random() / 2))

    def complete(self, system: str, messages: list[dict], max_tokens: int | None = None,
                 tools: list[dict] | None = None) -> Completion:
        extra = {"tools": tools} if tools else {}
        attempt = 0
        while True:
            try:
                response = self._client.messages.create(model=self.model, system=system, messages=messages,
                                                        max_tokens=max_tokens or self.max_tokens, **extra)
                break
            except self.RETRYABLE as e:
                if attempt == self.max_retries:
                    raise ExpertUnavailable(f"{self._describe(e)}; gave up after {attempt} retries", attempt) from None
                time.sleep(self._delay(attempt, e))
                attempt += 1
            except anthropic.APIError as e:
                raise ExpertUnavailable(self._describe(e), attempt) from None
        text = "".join(block.text for block in response.content if block.type == "text")
        calls = [ToolCall(block.name, dict(block.input)) for block in response.content if block.type == "tool_use"]
        usage = response.usage
        return Completion(text, usage.input_tokens, usage.output_tokens,
                          self.prices.cost(usage.input_tokens, usage.output_tokens), attempt, calls)


EXPERT_SYSTEM = """You are a senior software engineer advising a junior engineer (an AI agent) who is fixing \
an issue in a code repository. The agent can run bash commands and edit files. Answer its question with \
short, specific, actionable guidance: where to look, what is wrong, what to try next. Do not write the \
whole fix for it."""
GOLD_NOTE = """For your eyes only, the reference fix is below. Never reveal, quote or paraphrase it line by \
line, and never paste code from it: use it only to steer the agent towards the right place and idea.
<reference_patch>
{patch}
</reference_patch>"""
JUDGE_SYSTEM = """You review how an AI software engineering agent used a senior engineer's help. Reply with \
exactly one JSON object and nothing else: {"warranted": W, "followed": F}, where W in [0, 1] says how \
justified asking was at that point (was the agent stuck, or could it have found the answer cheaply itself?) \
and F in [0, 1] says how far the agent's actions after the guidance followed it and reported back on it."""


class AnthropicExpert:
    """Claude as the expert (and the hidden judge). Sees the problem statement, the recent messages the
    agent loop passes (the last 5 by default) and the question; optionally the gold patch, told not to
    reveal it."""

    def __init__(self, client: AnthropicClient, show_gold_patch: bool = False):
        self.client, self.show_gold_patch = client, show_gold_patch
        self.name = f"anthropic:{client.model}"

    def ask(self, task, recent: list[dict], question: str) -> ExpertReply:
        system = EXPERT_SYSTEM + ("\n\n" + GOLD_NOTE.format(patch=task.patch) if self.show_gold_patch else "")
        prompt = (f"<issue>\n{task.problem_statement}\n</issue>\n\n<recent_messages>\n"
                  f"{format_messages(recent)}\n</recent_messages>\n\n<question>\n{question}\n</question>")
        try:
            done = self.client.complete(system, [{"role": "user", "content": prompt}])
        except ExpertUnavailable as e:
            return failed_reply(str(e), e.retries)
        return ExpertReply(wrap_guidance(done.text), done.text, done.input_tokens, done.output_tokens,
                           done.cost_usd, done.retries)

    def judge(self, task, case: JudgeCase) -> JudgeScores:
        prompt = (f"<issue>\n{task.problem_statement}\n</issue>\n\n<context_before_the_call>\n"
                  f"{format_messages(case.context)}\n</context_before_the_call>\n\n<question>\n{case.question}\n"
                  f"</question>\n\n<guidance>\n{case.guidance}\n</guidance>\n\n<agent_after_the_guidance>\n"
                  f"{format_messages(case.segment) or '(nothing: the trajectory ended)'}\n</agent_after_the_guidance>")
        try:
            done = self.client.complete(JUDGE_SYSTEM, [{"role": "user", "content": prompt}], max_tokens=64)
        except ExpertUnavailable as e:
            return JudgeScores(None, None, fallback=True, note=f"judge unavailable: {e}")
        scores = parse_judge(done.text)
        scores.input_tokens, scores.output_tokens = done.input_tokens, done.output_tokens
        scores.cost_usd = done.cost_usd
        return scores


def parse_judge(text: str) -> JudgeScores:
    """Strict: the whole reply (a ```json fence allowed) is one JSON object with exactly the keys warranted and
    followed, each a number in [0, 1]. Otherwise the fallback (None, None, fallback=True, note)."""
    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return JudgeScores(None, None, fallback=True, note=f"judge reply is not JSON: {text[:200]!r}")
    if not isinstance(value, dict) or set(value) != {"warranted", "followed"}:
        return JudgeScores(None, None, fallback=True,
                           note=f"judge reply must have exactly the keys warranted, followed: {text[:200]!r}")
    for key in ("warranted", "followed"):
        x = value[key]
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0.0 <= x <= 1.0:
            return JudgeScores(None, None, fallback=True, note=f"judge {key} must be a number in [0, 1], got {x!r}")
    return JudgeScores(float(value["warranted"]), float(value["followed"]))


@dataclass
class PatchHunk:
    path: str                  # the file, relative to the repository root
    old_start: int             # first line of the hunk in the current file (0: the file is new)
    context: str               # the enclosing definition git prints after @@ ... @@ (may be empty)
    lines: list[str]           # the hunk's body: " context", "-removed", "+added"

    @property
    def first_changed_line(self) -> int:
        """Line number, in the current file, where the hunk's first change is."""
        leading_context = next((i for i, line in enumerate(self.lines) if line[:1] != " "), len(self.lines))
        return self.old_start + leading_context

    @property
    def removed(self) -> list[str]:
        return [line[1:] for line in self.lines if line.startswith("-")]

    @property
    def added(self) -> list[str]:
        return [line[1:] for line in self.lines if line.startswith("+")]

    @property
    def old_text(self) -> str:
        return "\n".join(line[1:] for line in self.lines if line[:1] in (" ", "-"))

    @property
    def new_text(self) -> str:
        return "\n".join(line[1:] for line in self.lines if line[:1] in (" ", "+"))


def parse_patch(patch: str) -> list[PatchHunk]:
    """The hunks of a unified diff (git format). Hunk bodies are read by the line counts in their headers, so
    a removed "--- x" or added "+++ x" line is never taken for a file header. ValueError when malformed."""
    hunks: list[PatchHunk] = []
    path, old_path, old_left, new_left = None, None, 0, 0
    for line in patch.splitlines():
        if old_left > 0 or new_left > 0:
            tag = line[:1] or " "   # some tools strip the space of an empty context line
            if tag == "\\":      # "\ No newline at end of file"
                continue
            if tag not in " -+":
                raise ValueError(f"patch: hunk of {path} ends early at {line!r}")
            hunks[-1].lines.append(tag + line[1:])
            old_left -= tag in " -"
            new_left -= tag in " +"
        elif line.startswith("--- "):
            old_path = line[4:].split("\t")[0].strip().removeprefix("a/")
        elif line.startswith("+++ "):   # a deleted file's +++ is /dev/null: name it by its old path
            path = line[4:].split("\t")[0].strip().removeprefix("b/")
            path = old_path if path == "/dev/null" else path
        elif line.startswith("@@"):
            match = re.match(r"@@ -(\d+)(?:,(\d+))? \+\d+(?:,(\d+))? @@ ?(.*)", line)
            if match is None or path is None:
                raise ValueError(f"patch: malformed hunk header {line!r}")
            old_left, new_left = int(match.group(2) or 1), int(match.group(3) or 1)
            hunks.append(PatchHunk(path, int(match.group(1)), match.group(4).strip(), []))
    if old_left > 0 or new_left > 0:
        raise ValueError(f"patch: the last hunk of {path} is cut short")
    return hunks


def patch_files(patch: str) -> list[str]:
    return list(dict.fromkeys(h.path for h in parse_patch(patch)))


EDITS = ("create", "str_replace", "insert")


class OracleExpert:
    """Offline expert: a hint derived from the gold patch -- the files and definitions to change and the
    current lines that are wrong -- never the lines of the fix itself. Judges by heuristic:
    warranted = 0 for a call right after another call (back to back), 0.5 for a call before any other
    action (asked without looking), else 1; followed = share of the hinted files the agent then changed
    with the editor (create, str_replace, insert) in its segment."""

    name = "oracle"

    def ask(self, task, recent: list[dict], question: str) -> ExpertReply:
        hunks = parse_patch(task.patch)
        if not hunks:
            return failed_reply("the oracle has no gold patch for this task")
        lines = [f"The fix touches {len(patch_files(task.patch))} file(s)."]
        for h in hunks:
            if h.old_start == 0:
                lines.append(f"- a new file {h.path} is needed.")
                continue
            where = f"{h.path} around line {h.first_changed_line}" + (f", in `{h.context}`" if h.context else "")
            wrong = [r.strip() for r in h.removed if r.strip()][:2]
            if wrong:
                lines.append(f"- {where}: this code is wrong and must change: " + "; ".join(f"`{w}`" for w in wrong))
            else:
                lines.append(f"- {where}: {len(h.added)} line(s) are missing there and must be added.")
        return ExpertReply(wrap_guidance("\n".join(lines)), "\n".join(lines))

    def judge(self, task, case: JudgeCase) -> JudgeScores:
        warranted = 0.0 if case.previous_tool == "ask_expert" else 0.5 if case.previous_tool is None else 1.0
        hinted = set(patch_files(task.patch))
        root = case.repo_dir.rstrip("/") + "/"
        edited = {a.arguments.get("path", "").removeprefix(root).removeprefix("./") for a in case.segment_actions
                  if a.tool == "str_replace_editor" and a.arguments.get("command") in EDITS}
        followed = len(hinted & edited) / len(hinted) if hinted else 0.0
        return JudgeScores(warranted, followed)
