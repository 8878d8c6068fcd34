"""One sequence being generated (a request with n samples has n of them) and a finished completion."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from protege.rollout.sampler.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"    # no KV blocks (new, or preempted: its KV is recomputed when it is admitted again)
    RUNNING = "running"    # holds KV blocks for all its tokens
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: int
    sample_index: int                 # which of the request's n samples
    token_ids: list[int]              # prompt, then the completion so far
    prompt_len: int
    params: SamplingParams
    seed: int | None                  # the key of its draws (sampling.row_seed); None for greedy requests
    base_seed: int = 0                # the request's seed, from which each sample's key is made
    forks_left: int = 0               # samples still to fork from this one when its prompt is computed
    status: Status = Status.WAITING
    num_computed: int = 0             # leading tokens whose KV is in the cache
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length" or "context limit"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def completion_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]


@dataclass
class Completion:
    """A finished sample. token_ids include the stop token that ended it (the trainer learns to stop);
    logprobs[i] = log p(token_ids[i]) under the temperature-scaled full distribution (before top-k/top-p;
    temperature 1 for greedy requests), computed by kernels.token_logprobs as in training."""
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: int
    prompt_ids: list[int]
    completions: list[Completion]  # n of them, by sample index
