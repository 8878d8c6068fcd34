"""The hidden judge's view of one expert call and its scores.

Per call: warranted (was asking justified, 0..1) and followed (did the agent act on the guidance, 0..1),
over the agent's segment from the guidance to the next call or the end. A judge model's reply must be
exactly {"warranted": x, "followed": y} with numbers in [0, 1]; anything else, or a judge that cannot be
reached, gives the fallback: both None (the reward treats the call as unscored), fallback=True, a note."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

JUDGE_SYSTEM = """You review how an AI software engineering agent used a senior engineer's help. Reply with \
exactly one JSON object and nothing else: {"warranted": W, "followed": F}, where W in [0, 1] says how \
justified asking was at that point (was the agent stuck, or could it have found the answer cheaply itself?) \
and F in [0, 1] says how far the agent's actions after the guidance followed it and reported back on it."""


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
    unavailable: bool = False       # the judge could not be reached (transport): no judgement at all
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0


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
