"""The expert behind ask_expert: Claude through the anthropic SDK, shown the issue, the agent's recent
messages and its question (optionally the gold patch, told not to reveal it); the same model is the hidden
judge. The offline expert is rollout.agent.oracle."""
from __future__ import annotations

from dataclasses import dataclass

from protege.rollout.agent.client import AnthropicClient, ExpertUnavailable
from protege.rollout.agent.judge import JUDGE_SYSTEM, JudgeCase, JudgeScores, parse_judge
from protege.rollout.agent.tools import truncate

GUIDANCE_OPEN, GUIDANCE_CLOSE = "<guidance>", "</guidance>"


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
    unavailable: bool = False          # the expert's API did not answer (transport): not the policy's doing


def wrap_guidance(text: str) -> str:
    return f"{GUIDANCE_OPEN}\n{text.strip()}\n{GUIDANCE_CLOSE}"


def failed_reply(error: str, retries: int = 0, unavailable: bool = False) -> ExpertReply:
    return ExpertReply(observation=f"ask_expert failed: {error}. Continue on your own.", retries=retries,
                       error=error, unavailable=unavailable)


def format_messages(messages: list[dict], limit: int = 4000) -> str:
    """Messages as plain text for a prompt, each cut to `limit` characters (head and tail)."""
    return "\n\n".join(f"[{m['role']}]\n{truncate(m['content'], limit)}" for m in messages)


EXPERT_SYSTEM = """You are a senior software engineer advising a junior engineer (an AI agent) who is fixing \
an issue in a code repository. The agent can run bash commands and edit files. Answer its question with \
short, specific, actionable guidance: where to look, what is wrong, what to try next. Do not write the \
whole fix for it."""
GOLD_NOTE = """For your eyes only, the reference fix is below. Never reveal, quote or paraphrase it line by \
line, and never paste code from it: use it only to steer the agent towards the right place and idea.
<reference_patch>
{patch}
</reference_patch>"""


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
            return failed_reply(str(e), e.retries, unavailable=True)
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
            return JudgeScores(None, None, fallback=True, note=f"judge unavailable: {e}", unavailable=True)
        scores = parse_judge(done.text)
        scores.input_tokens, scores.output_tokens = done.input_tokens, done.output_tokens
        scores.cost_usd = done.cost_usd
        return scores
