"""Sampling parameters of a request and the ops that pick next tokens from logits."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CONTEXT_OVERFLOW = ("error", "finish")


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0            # 0: greedy
    top_p: float = 1.0                  # nucleus: smallest set of tokens with probability >= top_p
    top_k: int = 0                      # 0: off
    max_tokens: int = 256               # completion tokens at most
    stop_token_ids: tuple[int, ...] = ()  # besides the model's EOS tokens (unless ignore_eos)
    stop: tuple[str, ...] = ()          # stop strings (need the sampler's tokenizer)
    seed: int | None = None             # per-request generator: same seed, same samples
    n: int = 1                          # samples of the prompt (its KV is computed once and shared)
    logprobs: bool = True               # report log p(token) of each sampled token
    ignore_eos: bool = False
    on_context_overflow: str = "error"  # prompt >= context limit: "error" raises, "finish" returns no tokens

    def __post_init__(self):
        def fail(field, why):
            raise ValueError(f"SamplingParams.{field}={getattr(self, field)!r}: {why}")

        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            fail("temperature", "expected a finite number >= 0 (0 = greedy)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            fail("top_p", "expected a number in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            fail("top_k", "expected an int >= 0 (0 = off)")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            fail("max_tokens", "expected an int >= 1")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            fail("n", "expected an int >= 1")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            fail("seed", "expected an int or None")
        if self.on_context_overflow not in CONTEXT_OVERFLOW:
            fail("on_context_overflow", f"expected one of {', '.join(CONTEXT_OVERFLOW)}")
        # Lists are accepted and frozen into tuples (the params are hashable and shared between samples).
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            fail("stop_token_ids", "expected non-negative ints")
        if any(not isinstance(s, str) or not s for s in self.stop):
            fail("stop", "expected non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample_tokens(z: torch.Tensor, params: list[SamplingParams],
                  generators: list[torch.Generator]) -> torch.Tensor:
    """One next token per row of z [B, V] (fp32 logits already divided by the row's temperature: the numbers
    whose log-softmax the sampler reports). Greedy rows take the argmax; the others sample from softmax(z)
    truncated to the top_k tokens and then to the top_p nucleus, by inverse CDF with one uniform number from
    the row's generator (so a request's samples depend only on its seed and its params, not on the batch)."""
    logits = z
    tokens = logits.argmax(-1)
    plain = [i for i, p in enumerate(params) if not p.greedy and not p.top_k and p.top_p == 1]
    truncated = [i for i, p in enumerate(params) if not p.greedy and (p.top_k or p.top_p < 1)]
    if plain:
        index = torch.tensor(plain, device=logits.device)
        probs = logits[index].softmax(-1)
        tokens[index] = _draw(probs, [generators[i] for i in plain])
    if truncated:
        # Truncation works on the tokens sorted by probability; the draw then indexes that order.
        index = torch.tensor(truncated, device=logits.device)
        scaled, order = logits[index].sort(-1, descending=True)
        vocab = logits.shape[-1]
        top_k = torch.tensor([params[i].top_k or vocab for i in truncated], device=logits.device)
        ranks = torch.arange(vocab, device=logits.device)
        probs = scaled.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf")).softmax(-1)
        top_p = torch.tensor([params[i].top_p for i in truncated], device=logits.device, dtype=torch.float32)
        mass_before = probs.cumsum(-1) - probs  # the most likely token is always kept
        # top_p == 1 cuts nothing (the rounded cumulative sum may reach 1 before the last token).
        probs = probs.masked_fill((mass_before >= top_p[:, None]) & (top_p[:, None] < 1), 0.0)
        picked = _draw(probs, [generators[i] for i in truncated])
        tokens[index] = order.gather(-1, picked[:, None]).squeeze(-1)
    return tokens


def _draw(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Inverse CDF: one uniform number per row from its own generator."""
    cdf = probs.double().cumsum(-1)  # fp64: tokens of tiny probability keep a non-empty interval
    uniform = torch.cat([torch.rand(1, generator=g, device=probs.device, dtype=torch.float64) for g in generators])
    picked = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True)
    return picked.squeeze(-1).clamp_(max=probs.shape[-1] - 1)
