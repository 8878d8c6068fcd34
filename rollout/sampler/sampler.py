"""The sampler: generates completions with the training model itself over a paged KV cache.

Batch interface: generate(prompts, params) -> one Completion per prompt (a list of n with params.n > 1).
Incremental interface (agent loops): add_request(prompt_ids, params) -> request id; step() advances every
running sequence by one scheduler step and returns the requests that finished in it.

Between rollout and training phases, release() frees the KV pool (rebuilt, and re-sized from the memory
free then, on the next request). When the weights change the prefix cache and CUDA graphs are dropped: the
sampler checks the weights itself at every new request (new_weight_version() says so explicitly).
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from protege.kernels import dispatch as kernels
from protege.engine import _C
from protege.rollout.sampler.kv_cache import KVCache, bytes_per_block
from protege.rollout.sampler.model_runner import ModelRunner
from protege.rollout.sampler.sampling import TOP_P_CANDIDATES, SamplingParams, row_seed, sample_tokens
from protege.rollout.sampler.scheduler import Scheduler
from protege.rollout.sampler.sequence import Completion, RequestOutput, Sequence, Status


@dataclass
class SamplerStats:
    prompt_tokens: int = 0           # prompt tokens submitted (once per request, whatever n)
    cached_tokens: int = 0           # tokens whose KV came from the prefix cache instead of being computed
    computed_tokens: int = 0         # tokens run through the model (prefill, decode and recomputation)
    prompt_tokens_computed: int = 0  # of those, prompt positions
    generated_tokens: int = 0
    preemptions: int = 0
    steps: int = 0
    host_seconds: float = 0.0        # scheduling, input building, bookkeeping (outside model and sampling ops)
    serial_host_seconds: float = 0.0  # of which the device waits for: before the launch, after the read-back
    device_seconds: float = 0.0      # model forward and sampling ops, until the tokens are on the host
    blocks_in_use: int = 0
    peak_blocks_in_use: int = 0

    @property
    def host_ms_per_step(self) -> float:
        return 1e3 * self.host_seconds / max(1, self.steps)


KV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _sharded(model) -> bool:
    return _weights_key(model) is None


def _weights_key(model):
    """What identifies the weights: the model's version and each parameter's storage and in-place write
    count; None while any parameter is a sharded DTensor."""
    key = [getattr(model, "weight_version", 0)]
    for p in model.parameters():
        if isinstance(p, DTensor):
            return None
        key.append((p.data_ptr(), p._version))
    return tuple(key)


@dataclass
class StepRecord:
    """One sampler step as the optional `Sampler.on_step` callback sees it (schedule traces, benchmarks)."""
    end: float            # time.perf_counter() when the step's tokens were on the host
    seconds: float        # the step's wall time, scheduling included
    sequences: int        # sequences that ran in the step: the running batch
    decode_rows: int      # of which one-token rows (decoding); the others ran a prefill chunk
    tokens: int           # tokens through the model
    context: int          # tokens the step's rows attend over, in all (their KV read)


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    completions: list[Completion | None]
    unfinished: int = 0   # completions still None (counted: checking them all at each finish is quadratic)


class Sampler:
    top_p_candidates = TOP_P_CANDIDATES   # tokens a top_p-only draw looks at before it falls back to all

    def __init__(self, model, *, num_blocks: int | None = None, kv_cache_bytes: int | None = None,
                 kv_cache_fraction: float = 0.8, kv_dtype: torch.dtype | None = None, block_size: int = 16,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 4096, max_model_len: int | None = None,
                 eos_token_ids=None, tokenizer=None, seed: int = 0, cuda_graph_sizes: tuple[int, ...] | None = None,
                 cuda_graph_max_query_len: int = 64):
        """model: engine.model.Qwen2ForCausalLM (unsharded, or FSDP2-sharded and sampled in rollout mode). The
        KV pool holds num_blocks blocks of block_size tokens, or as many as fit in kv_cache_bytes; with
        neither, kv_cache_fraction of the GPU memory free when the pool is (re)built (CUDA), or room for 8
        sequences of max_position_embeddings tokens up to 2 GiB (CPU). kv_dtype: default the dtype the
        model computes in (its unsharded weights'). eos_token_ids default to the model config's; tokenizer
        (with .decode(ids)) is needed only for stop strings. cuda_graph_sizes: batch sizes B captured as CUDA
        graphs (default on CUDA: 1, 2, 4, ..., max_num_seqs; () disables), each for decode steps of B sequences
        and for steps of B + cuda_graph_max_query_len tokens, none more than cuda_graph_max_query_len per
        sequence (decode rows plus a prefill chunk: the agent loop's step; 1 captures decode only)."""
        if num_blocks is not None and kv_cache_bytes is not None:
            raise ValueError("Sampler: give at most one of num_blocks and kv_cache_bytes (the KV pool size)")
        if kv_dtype is not None and kv_dtype not in KV_DTYPES:
            raise ValueError(f"Sampler: kv_dtype={kv_dtype} is not supported by the kernels: use float16, "
                             f"bfloat16 or float32")
        if not 0 < kv_cache_fraction <= 1:
            raise ValueError(f"Sampler: kv_cache_fraction={kv_cache_fraction} must be in (0, 1]")
        self.model, self.config = model, model.config
        self.device = model.lm_head_weight.device
        self.block_size = block_size
        self._pool_size = (num_blocks, kv_cache_bytes, kv_cache_fraction, max_model_len, kv_dtype)
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        if eos_token_ids is None:
            eos = self.config.eos_token_id
            eos_token_ids = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.tokenizer = tokenizer
        if cuda_graph_sizes is None:
            cuda_graph_sizes = tuple(s for s in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if s <= max_num_seqs) \
                if self.device.type == "cuda" else ()
        self.cuda_graph_sizes, self.cuda_graph_max_query_len = cuda_graph_sizes, cuda_graph_max_query_len
        self.stats = SamplerStats()
        self.on_step = None   # optional callable(StepRecord) after every step: a cheap trace, off by default
        self._seeds = random.Random(seed)
        self._requests: dict[int, _Request] = {}
        self._done: list[RequestOutput] = []  # finished, not yet returned by step()
        self._next_request_id = self._next_seq_id = 0
        self.kv_cache = None
        self._weight_version = 0   # bumped whenever the weights are seen to change; survives release()
        self._weights_seen = None  # the weights' key when last checked (_weights_key)
        self.dtype = self.num_blocks = self.max_model_len = None
        if not _sharded(model):    # else sized when first used, in rollout mode
            self._size_pool()

    # -- KV pool lifecycle ------------------------------------------------------------------------------
    def _size_pool(self) -> None:
        """KV dtype, block count and context limit, from the weights the sampler reads now and the memory free
        now (called at construction and whenever a pool is built)."""
        num_blocks, kv_cache_bytes, fraction, max_model_len, kv_dtype = self._pool_size
        self.dtype = kv_dtype or self.model.lm_head_weight.dtype
        if self.dtype not in KV_DTYPES:
            raise ValueError(f"Sampler: the model computes in {self.dtype}; pass kv_dtype= (float16, bfloat16 "
                             f"or float32)")
        per_block = bytes_per_block(self.config, self.block_size, self.dtype)
        if num_blocks is None and kv_cache_bytes is None:
            if self.device.type == "cuda":
                # mem_get_info counts the caching allocator's idle blocks (the last rollout's pool, training's
                # freed buffers) as used: give them back first, or every rollout's pool is smaller than the last.
                torch.cuda.empty_cache()
                kv_cache_bytes = int(fraction * torch.cuda.mem_get_info(self.device)[0])
            else:
                per_token = bytes_per_block(self.config, 1, self.dtype)
                kv_cache_bytes = min(2 << 30, 8 * self.config.max_position_embeddings * per_token)
        self.num_blocks = num_blocks if num_blocks is not None else int(kv_cache_bytes) // per_block
        if self.num_blocks < 1:
            raise ValueError(f"Sampler: kv_cache_bytes={kv_cache_bytes} holds no block of {self.block_size} "
                             f"tokens ({per_block} bytes)")
        limit = min(self.config.max_position_embeddings, self.num_blocks * self.block_size)
        if max_model_len is not None and max_model_len > limit:
            raise ValueError(f"Sampler: max_model_len={max_model_len} exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings} or the KV pool "
                             f"({self.num_blocks * self.block_size} tokens)")
        self.max_model_len = max_model_len or limit

    def _ensure_pool(self):
        if self.kv_cache is not None:
            return
        self._size_pool()
        self.kv_cache = KVCache(self.config, self.num_blocks, self.block_size, self.dtype, self.device)
        self.block_manager = _C.BlockManager(self.num_blocks, self.block_size)
        self.scheduler = Scheduler(self.block_manager, self.max_num_seqs, self.max_num_batched_tokens)
        self._counted = (0, 0)   # the new scheduler's cached tokens and preemptions already in self.stats
        self._new_runner()

    def _new_runner(self):
        max_blocks = -(-self.max_model_len // self.block_size)
        self.runner = ModelRunner(self.model, self.kv_cache, self.block_manager, max_blocks, self.cuda_graph_sizes,
                                  self.max_num_seqs, self.cuda_graph_max_query_len)
        self.scheduler.on_free = self.runner.forget

    def _check_weights(self) -> None:
        """Before new prompts meet the prefix cache: weights changed since the last check (an optimizer step,
        a load, a rollout-mode switch: new storage or an in-place write) mean new weights, whoever forgot to
        say so."""
        key = _weights_key(self.model)
        if key is None:
            raise RuntimeError("Sampler: the model's parameters are sharded (FSDP2 DTensors): sample it in "
                               "rollout mode (engine.training.parallelize.RolloutMode)")
        if key != self._weights_seen:
            if self._requests:
                raise RuntimeError(f"Sampler: the model's weights changed while {len(self._requests)} "
                                   f"request(s) were running; finish or abort them before updating weights")
            if self._weights_seen is not None:
                self._on_new_weights()
            self._weights_seen = key

    def _on_new_weights(self) -> None:
        if self.kv_cache is not None:
            self.block_manager.bump_version()   # cached prefixes were computed with the old weights
            self._new_runner()                  # CUDA graphs hold the old parameter addresses
        self._weight_version += 1

    @property
    def num_unfinished(self) -> int:
        return len(self._requests) + len(self._done)

    def _check_idle(self, what: str):
        if self._requests:
            raise RuntimeError(f"Sampler.{what}: {len(self._requests)} requests are still running")

    def release(self) -> None:
        """Free the KV pool (and the prefix cache with it); the next request builds a new one."""
        self._check_idle("release")
        if self.kv_cache is not None:
            self.kv_cache.release()
            self.kv_cache = self.block_manager = self.scheduler = self.runner = None

    def abort_all(self) -> list[int]:
        """Drop every unfinished request, and the KV pool with them (a failed step may have left it half
        updated): the sampler is idle and usable again. Returns the dropped request ids."""
        dropped = sorted(set(self._requests) | {out.request_id for out in self._done})
        self._requests.clear()
        self._done.clear()
        if self.kv_cache is not None:
            self.kv_cache.release()
            self.kv_cache = self.block_manager = self.scheduler = self.runner = None
        return dropped

    def new_weight_version(self) -> int:
        """The model's weights changed: cached prefixes and CUDA graphs (made with the old ones) are never
        used again. The sampler also notices by itself at the next request (_check_weights)."""
        self._check_idle("new_weight_version")
        self._on_new_weights()
        self._weights_seen = _weights_key(self.model)
        return self._weight_version

    # -- requests -----------------------------------------------------------------------------------------
    def add_request(self, prompt_ids, params: SamplingParams | None = None) -> int:
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        prompt = self._check_prompt(prompt_ids)
        self._check_weights()
        self._ensure_pool()
        if params.n > self.max_num_seqs:
            raise ValueError(f"SamplingParams.n={params.n} exceeds the sampler's max_num_seqs={self.max_num_seqs}")
        if params.stop and self.tokenizer is None:
            raise ValueError(f"SamplingParams.stop={params.stop!r} needs a tokenizer: Sampler(..., tokenizer=)")
        request_id = self._next_request_id
        self._next_request_id += 1
        self.stats.prompt_tokens += len(prompt)
        if len(prompt) >= self.max_model_len:
            if params.on_context_overflow == "error":
                raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in the context limit of "
                                 f"{self.max_model_len} tokens (SamplingParams.on_context_overflow='finish' "
                                 f"returns a 'context limit' result instead)")
            self._done.append(RequestOutput(request_id, prompt, [
                Completion([], [] if params.logprobs else None, "context limit") for _ in range(params.n)]))
            return request_id
        self._requests[request_id] = _Request(prompt, params, [None] * params.n, params.n)
        base_seed = params.seed if params.seed is not None else self._seeds.randrange(2 ** 62)
        parent = self._new_sequence(request_id, 0, list(prompt), len(prompt), params, base_seed)
        parent.forks_left = params.n - 1
        self.scheduler.add(parent)
        return request_id

    def _check_prompt(self, prompt_ids) -> list[int]:
        if isinstance(prompt_ids, torch.Tensor):
            prompt_ids = prompt_ids.tolist()
        prompt = list(prompt_ids)
        if not prompt:
            raise ValueError("empty prompt: a prompt needs at least one token")
        vocab = self.config.vocab_size
        for i, t in enumerate(prompt):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"prompt token {i} is {t!r}: expected an int in [0, vocab_size={vocab})")
        return prompt

    def _new_sequence(self, request_id, sample_index, token_ids, prompt_len, params, base_seed) -> Sequence:
        seed = None if params.greedy else row_seed(base_seed, sample_index)
        seq = Sequence(self._next_seq_id, request_id, sample_index, token_ids, prompt_len, params, seed, base_seed)
        self._next_seq_id += 1
        return seq

    def has_unfinished(self) -> bool:
        return bool(self._requests or self._done)

    # -- stepping -----------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One scheduler step; returns the requests finished by it (and any finished at submission)."""
        finished, self._done = self._done, []
        if not self._requests:
            return finished
        if self.model.weight_version != self._weights_seen[0]:
            raise RuntimeError(f"Sampler.step: the model's weights changed (version {self.model.weight_version}) "
                               f"while {len(self._requests)} request(s) were running")
        t0 = time.perf_counter()
        schedule = self.scheduler.schedule()
        if not schedule.seqs:  # cannot happen by design (some owner always runs): fail, never hang
            raise RuntimeError(f"scheduler made no progress with {len(self.scheduler.running)} running and "
                               f"{len(self.scheduler.waiting)} waiting sequences")
        inputs = self.runner.prepare(schedule)
        t1 = time.perf_counter()
        hidden = self.runner.forward(inputs)  # a row per sampling sequence below, forks included, in order
        t2 = time.perf_counter()
        self.block_manager.commit_batch(schedule.seq_ids, schedule.stops)
        sampling: list[Sequence] = []
        for seq, start, stop in zip(schedule.seqs, schedule.starts, schedule.stops):
            seq.num_computed = stop
            if start < seq.prompt_len:
                self.stats.prompt_tokens_computed += min(stop, seq.prompt_len) - start
            if stop == seq.num_tokens:
                sampling.append(seq)
                if seq.forks_left:
                    sampling += self._fork(seq)
        self.stats.computed_tokens += inputs.num_tokens
        t3 = time.perf_counter()
        tokens, logprobs = self._sample(hidden, sampling) if sampling else ([], [])
        t4 = time.perf_counter()
        self.block_manager.append_batch([seq.seq_id for seq in sampling], tokens)
        self.stats.generated_tokens += len(sampling)
        done: list[Sequence] = []
        for seq, token, logprob in zip(sampling, tokens, logprobs):
            self._append(seq, token, logprob, done)
        self.scheduler.finish(done)
        for seq in done:
            self._complete(seq, finished)
        t5 = time.perf_counter()
        s = self.stats
        s.steps += 1
        s.host_seconds += (t1 - t0) + (t3 - t2) + (t5 - t4)
        s.serial_host_seconds += (t1 - t0) + (t5 - t4)   # (t2..t3 runs while the device computes the step)
        s.device_seconds += (t2 - t1) + (t4 - t3)
        # The scheduler's counters start at 0 with each pool: accumulate what they added since the last step.
        s.cached_tokens += self.scheduler.cached_tokens - self._counted[0]
        s.preemptions += self.scheduler.preemptions - self._counted[1]
        self._counted = (self.scheduler.cached_tokens, self.scheduler.preemptions)
        s.blocks_in_use = self.block_manager.num_blocks_in_use
        s.peak_blocks_in_use = max(s.peak_blocks_in_use, s.blocks_in_use)
        if self.on_step is not None:
            decode = sum(stop - start == 1 for start, stop in zip(schedule.starts, schedule.stops))
            self.on_step(StepRecord(t5, t5 - t0, len(schedule.seqs), decode, inputs.num_tokens, sum(schedule.stops)))
        return finished

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """The other n - 1 samples of a request, sharing the parent's computed prompt blocks."""
        children = []
        for i in range(parent.params.n - parent.forks_left, parent.params.n):
            child = self._new_sequence(parent.request_id, i, list(parent.token_ids), parent.prompt_len,
                                       parent.params, parent.base_seed)
            self.block_manager.fork(parent.seq_id, child.seq_id)
            child.status, child.num_computed = Status.RUNNING, parent.num_computed
            self.scheduler.running.append(child)
            children.append(child)
        parent.forks_left = 0
        return children

    def _sample(self, hidden: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[float | None]]:
        """Draw each row's token from softmax(z), z the temperature-scaled fp32 logits exactly as
        kernels.token_logprobs computes them, and report log p(token) of that distribution. Exact mode: by
        token_logprobs itself, the trainer's op, so the bits are the trainer's (a second pass over the LM head:
        on a GPU a reduction over stored z sums in another order than the fused op's, found on an H200); fast
        mode: from the same z (one pass). Row i's uniform number is philox(its seed, its position): one launch
        for the batch, and a sample's draws depend on its seed only, never on the batch."""
        weight = self.model.lm_head_weight
        params = [s.params for s in seqs]
        n = len(seqs)
        by_temperature: dict[float, list[int]] = {}
        for i, p in enumerate(params):
            by_temperature.setdefault(p.temperature or 1.0, []).append(i)
        groups = []   # (rows, their index on the device or None for all rows, their z)
        with torch.inference_mode():
            keys = self._upload([[s.seed or 0 for s in seqs], [s.num_tokens for s in seqs]], torch.int64)
            uniforms = kernels.philox_uniforms(keys[0], keys[1])
            tokens = torch.empty(n, dtype=torch.int64, device=self.device)
            out = torch.empty(3, n, dtype=torch.float64, device=self.device)   # token, log-prob, complete
            for temperature, idx in by_temperature.items():
                index = None if len(idx) == n else self._upload(idx, torch.int64)
                h = hidden if index is None else hidden[index]
                z = kernels.head_logits(h, weight, temperature)
                groups.append((idx, index, h, z))
                picked, complete = sample_tokens(z, [params[i] for i in idx],
                                                 uniforms if index is None else uniforms[index],
                                                 self.top_p_candidates)
                rows = slice(None) if index is None else index
                tokens[rows] = picked
                out[1, rows] = self._logprobs(h, z, picked, temperature).double()
                out[2, rows] = complete.double()
            out[0] = tokens.double()   # fp64 holds token ids exactly
            both = out.tolist()        # the step's one device-to-host transfer
            if not all(both[2]):       # a top_p nucleus wider than the candidates: those rows over all tokens
                self._redraw(both, groups, params, uniforms)
        tokens_out = [int(t) for t in both[0]]
        logprobs = [None if not p.logprobs else v for p, v in zip(params, both[1])]
        return tokens_out, logprobs

    def _redraw(self, both, groups, params, uniforms) -> None:
        """Rows whose nucleus was wider than the candidates, drawn again over the sorted vocabulary from the same z
        and number (rare: its reads back are the only ones besides the step's)."""
        for idx, index, h, z in groups:
            local = [k for k, i in enumerate(idx) if not both[2][i]]
            if not local:
                continue
            rows = torch.tensor(local, device=self.device)
            mine = uniforms if index is None else uniforms[index]
            picked, _ = sample_tokens(z[rows], [params[idx[k]] for k in local], mine[rows], candidates=None)
            logp = self._logprobs(h[rows], z[rows], picked, params[idx[local[0]]].temperature or 1.0)
            for k, token, value in zip(local, picked.tolist(), logp.double().tolist()):
                both[0][idx[k]], both[1][idx[k]] = token, value

    def _logprobs(self, hidden, z, tokens, temperature) -> torch.Tensor:
        """log p(tokens) [rows] fp32: the trainer's fused op in exact mode, else from z (see _sample)."""
        if self.model.exact:
            return kernels.token_logprobs(hidden, self.model.lm_head_weight, tokens, temperature, check_ids=False)
        return kernels.logprobs_from_logits(z, tokens)

    def _upload(self, values, dtype) -> torch.Tensor:
        """Host numbers onto the device without blocking it: through pinned memory on CUDA (the caching host
        allocator keeps the buffer until the copy is done)."""
        t = torch.tensor(values, dtype=dtype)
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    def _append(self, seq: Sequence, token: int, logprob: float | None, done: list[Sequence]):
        """The sampled token (already given to the block manager) joins the sequence, which may finish."""
        seq.token_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        reason = self._finish_reason(seq, token)
        if reason is not None:
            seq.finish_reason, seq.stop_reason = reason
            done.append(seq)

    def _complete(self, seq: Sequence, finished: list[RequestOutput]):
        """A finished sequence's completion; its request's output once all its samples are done."""
        request = self._requests[seq.request_id]
        request.completions[seq.sample_index] = Completion(
            seq.completion_ids, seq.logprobs if seq.params.logprobs else None, seq.finish_reason, seq.stop_reason)
        request.unfinished -= 1
        if not request.unfinished:
            del self._requests[seq.request_id]
            finished.append(RequestOutput(seq.request_id, request.prompt_ids, request.completions))

    def _finish_reason(self, seq: Sequence, token: int):
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            return "stop", token
        if p.stop:
            text = self.tokenizer.decode(seq.completion_ids)
            found = [(text.find(s), s) for s in p.stop if s in text]
            if found:
                return "stop", min(found)[1]
        if len(seq.token_ids) - seq.prompt_len >= p.max_tokens:
            return "length", None
        if len(seq.token_ids) >= self.max_model_len:
            return "context limit", None
        return None

    # -- batch interface ----------------------------------------------------------------------------------
    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None):
        """Completions of every prompt, in order: a Completion each, or a list of n when params.n > 1.
        Requests submitted through add_request meanwhile keep running; their results come from step()."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        elif len(params) != len(prompts):
            raise ValueError(f"generate: {len(params)} SamplingParams for {len(prompts)} prompts")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        wanted, results, others = set(ids), {}, []
        while len(results) < len(ids):
            for out in self.step():
                if out.request_id in wanted:
                    results[out.request_id] = out
                else:
                    others.append(out)
        self._done.extend(others)
        return [results[i].completions[0] if sp.n == 1 else results[i].completions for i, sp in zip(ids, params)]
