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


# Top-p draws look at the most likely TOP_P_CANDIDATES tokens (one top-k selection, no sort of the vocabulary);
# a row whose nucleus is wider is reported incomplete and drawn again over the sorted vocabulary.
TOP_P_CANDIDATES = 1024


def row_seed(base_seed: int, sample_index: int) -> int:
    """The generator key of a request's sample: its draws are philox(key, position of the drawn token)."""
    return (base_seed * 1_000_003 + sample_index) % 2 ** 63


def sample_tokens(z: torch.Tensor, params: list[SamplingParams], uniforms: torch.Tensor,
                  candidates: int | None = TOP_P_CANDIDATES) -> tuple[torch.Tensor, torch.Tensor]:
    """One next token per row of z [B, V] (fp32 logits already divided by the row's temperature: the numbers
    whose log-softmax the sampler reports) -> (tokens [B], complete [B] bool). Greedy rows take the argmax; the
    others sample from softmax(z) truncated to the top_k tokens and then to the top_p nucleus, by inverse CDF
    at the row's uniform number (uniforms [B] fp64: a row's draw depends on its own z, params and number only).
    Truncation works on a top-k selection, never a sort of the vocabulary: top_k rows on their k best tokens,
    top_p-only rows on the `candidates` best (None: all); complete is False where the nucleus did not close
    within them (that row's token is not valid: draw it again with candidates=None)."""
    vocab = z.shape[-1]
    tokens = z.argmax(-1)
    complete = torch.ones(len(params), dtype=torch.bool, device=z.device)
    groups: dict[tuple[int, bool] | None, list[int]] = {}   # None: untruncated; else (candidates, top_k given)
    for i, p in enumerate(params):
        if p.greedy:
            continue
        if not p.top_k and p.top_p == 1:
            groups.setdefault(None, []).append(i)
        else:
            k = min(p.top_k, vocab) if p.top_k else min(candidates or vocab, vocab)
            groups.setdefault((k, bool(p.top_k)), []).append(i)
    for key, rows in groups.items():
        # All rows: a slice (views, no index upload); else their index.
        index = slice(None) if len(rows) == len(params) else torch.tensor(rows, device=z.device)
        zr, u = z[index], uniforms[index]
        if key is None:
            picked = _draw(zr.softmax(-1), u)
        else:
            k, renormalise = key
            best, order = zr.topk(k, dim=-1)   # sorted, most likely first
            # top_k: softmax over the k kept tokens; top_p alone: the full distribution's probabilities.
            probs = best.softmax(-1) if renormalise else (best - zr.logsumexp(-1, keepdim=True)).exp()
            top_p = torch.tensor([params[i].top_p for i in rows], device=z.device, dtype=torch.float32)[:, None]
            cumulative = probs.cumsum(-1)
            # The most likely token is always kept; top_p == 1 cuts nothing (the rounded sum may reach 1 early).
            probs = probs.masked_fill((cumulative - probs >= top_p) & (top_p < 1), 0.0)
            if not renormalise and k < vocab:
                complete[index] = cumulative[:, -1] >= top_p[:, 0]
            picked = order.gather(-1, _draw(probs, u)[:, None]).squeeze(-1)
        tokens[index] = picked
    return tokens, complete


def _draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse CDF at one uniform number per row."""
    cdf = probs.double().cumsum(-1)  # fp64: tokens of tiny probability keep a non-empty interval
    picked = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True)
    return picked.squeeze(-1).clamp_(max=probs.shape[-1] - 1)
