"""The Anthropic Messages API client behind the Claude policy, expert and judge: bounded, counted retries and
costs. The key comes only from the ANTHROPIC_API_KEY environment variable and is never logged or written."""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field

from protege.engine.chat import ToolCall
from protege.engine.optional import require

API_KEY_ENV = "ANTHROPIC_API_KEY"


@dataclass(frozen=True)
class Prices:
    """US dollars per million tokens (defaults: Claude Sonnet list prices)."""
    input_per_mtok: float = 3.0
    output_per_mtok: float = 15.0

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok) / 1e6


@dataclass
class ClientReply:
    """One Messages API call's answer and what it cost."""
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


class AnthropicClient:
    """The Messages API with our own retry loop (SDK retries off, so retries are counted and bounded):
    exponential backoff, or the server's retry-after when it sends one, on 408/429/5xx, timeouts and
    connection errors; other errors fail at once. Thread-safe (the SDK's HTTP client is)."""

    def __init__(self, model: str, base_url: str | None = None, prices: Prices = Prices(), max_retries: int = 4,
                 backoff_s: float = 1.0, max_backoff_s: float = 30.0, timeout_s: float = 120.0,
                 max_tokens: int = 2048):
        self._sdk = anthropic = require("anthropic", "Claude as policy, expert or judge")
        self._retryable = (anthropic.RateLimitError, anthropic.InternalServerError, anthropic.RequestTimeoutError,
                           anthropic.APIConnectionError)  # APITimeoutError is an APIConnectionError
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
                 tools: list[dict] | None = None) -> ClientReply:
        extra = {"tools": tools} if tools else {}
        attempt = 0
        while True:
            try:
                response = self._client.messages.create(model=self.model, system=system, messages=messages,
                                                        max_tokens=max_tokens or self.max_tokens, **extra)
                break
            except self._retryable as e:
                if attempt == self.max_retries:
                    raise ExpertUnavailable(f"{self._describe(e)}; gave up after {attempt} retries", attempt) from None
                time.sleep(self._delay(attempt, e))
                attempt += 1
            except self._sdk.APIError as e:
                raise ExpertUnavailable(self._describe(e), attempt) from None
        text = "".join(block.text for block in response.content if block.type == "text")
        calls = [ToolCall(block.name, dict(block.input)) for block in response.content if block.type == "tool_use"]
        usage = response.usage
        return ClientReply(text, usage.input_tokens, usage.output_tokens,
                          self.prices.cost(usage.input_tokens, usage.output_tokens), attempt, calls)
