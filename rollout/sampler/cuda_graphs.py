"""CUDA graphs of the sampler's step, captured per bucket on the KV pool and one version of the model's weights.

A bucket (tokens, max_query_len) takes any step of at most `tokens` tokens whose sequences each bring at most
`max_query_len` of them: pure decode steps (max_query_len 1, a bucket per batch size B) and the common agent
step, decode rows plus a prefill chunk (max_query_len C, B + C tokens). The step is padded to the bucket: every
padding token is a sequence of its own that writes nothing (slot -1) and attends to one cached key, and the
sequence slots left over hold no token (the attention kernels skip them). The paged-attention grid depends
only on the number of sequence slots, max_query_len and the block-table width, all fixed per bucket, and it
reads cu_seqlens and context lengths from device memory, so one capture serves every step of the bucket.
Triton path only (the PyTorch reference path reads metadata on the host).

A graph holds the parameters' addresses and the projection mode it was captured with: StepGraphs records
them with the model's weight_version, and refuses to replay once the version or the mode differ (checked at
every replay; the addresses are the sampler's to compare: it does so at every new request and builds a new
runner, hence new graphs, when they changed). capture=False runs the same padded step eagerly through the same
static buffers: what the CPU tests check against the unpadded step."""
from __future__ import annotations

from collections import Counter

import torch

from protege.rollout.sampler.attention import AttentionMetadata, PagedAttention
from protege.rollout.sampler.kv_cache import KVCache


def graph_buckets(batch_sizes, max_query_len: int) -> list[tuple[int, int]]:
    """(tokens, max_query_len) of every graph, smallest first: B decode tokens, and B + C tokens with up to C per
    sequence (C = max_query_len > 1), for each batch size B."""
    buckets = {(b, 1) for b in batch_sizes}
    if max_query_len > 1:
        buckets |= {(b + max_query_len, max_query_len) for b in batch_sizes}
    return sorted(buckets)


def pick_bucket(buckets: list[tuple[int, int]], num_tokens: int, max_query_len: int) -> tuple[int, int] | None:
    """The smallest bucket that takes a step of num_tokens tokens, none of its sequences bringing more than
    max_query_len of them (None: the step runs eagerly)."""
    return next((b for b in buckets if b[0] >= num_tokens and b[1] >= max_query_len), None)


class StaticInputs:
    """The device buffers every graph reads, sized for the largest bucket (a bucket of N tokens uses the first
    N token rows and N sequence slots), and the padding of a step into them."""

    def __init__(self, max_tokens: int, max_blocks_per_seq: int, device):
        n = max_tokens
        self.ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slots = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.cu_seqlens = torch.zeros(n + 1, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.tables = torch.zeros((n, max_blocks_per_seq), dtype=torch.int32, device=device)
        self._arange = torch.arange(n + 1, dtype=torch.int32, device=device)

    def metadata(self, tokens: int, max_query_len: int) -> AttentionMetadata:
        """A bucket's view: `tokens` token rows and as many sequence slots."""
        return AttentionMetadata(self.slots[:tokens], self.tables[:tokens], self.cu_seqlens[:tokens + 1],
                                 self.context_lens[:tokens], max_query_len)

    def fill(self, inputs, tokens: int) -> None:
        """The step's T tokens of B sequences, then T..tokens-1 as one-token sequences (token 0, position 0,
        slot -1, context 1, block-table entry 0: block 0), then empty sequence slots up to `tokens`.
        Device-to-device copies only: no host wait."""
        t, b, width = inputs.num_tokens, inputs.num_seqs, inputs.tables.shape[1]
        pad = tokens - t
        self.ids[:t] = inputs.ids
        self.ids[t:tokens] = 0
        self.positions[:t] = inputs.positions
        self.positions[t:tokens] = 0
        self.slots[:t] = inputs.slots
        self.slots[t:tokens] = -1
        self.cu_seqlens[:b + 1] = inputs.cu_seqlens
        self.cu_seqlens[b + 1:b + 1 + pad] = self._arange[t + 1:tokens + 1]
        self.cu_seqlens[b + 1 + pad:tokens + 1] = tokens
        self.context_lens[:b] = inputs.context_lens
        self.context_lens[b:tokens] = 1
        self.tables[:b, :width] = inputs.tables
        self.tables[b:tokens, 0] = 0   # padding sequences read only their first entry


class StepGraphs:
    """One CUDA graph per bucket (graph_buckets), sharing StaticInputs and one memory pool."""

    def __init__(self, model, kv_cache: KVCache, max_blocks_per_seq: int, batch_sizes: tuple[int, ...],
                 max_query_len: int = 64, capture: bool = True):
        self.model, self.kv_cache = model, kv_cache
        self.weight_version, self.exact = model.weight_version, model.exact
        self.parameters = tuple(p.data_ptr() for p in model.parameters())   # what the graphs read
        self.replays: Counter = Counter()   # steps run per bucket
        self.buckets = graph_buckets(batch_sizes, max_query_len)
        self.static = StaticInputs(self.buckets[-1][0] if self.buckets else 0, max_blocks_per_seq,
                                   kv_cache.pool.device)
        self.capture = capture
        self.graphs, self.outputs = {}, {}
        if capture:
            pool = None
            for bucket in sorted(self.buckets, reverse=True):  # largest first: the others reuse its memory
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side), torch.inference_mode():
                    self._step(bucket)  # compiles the kernels outside the capture
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool), torch.inference_mode():
                    self.outputs[bucket] = self._step(bucket)
                pool = graph.pool()
                self.graphs[bucket] = graph

    def _step(self, bucket: tuple[int, int]) -> torch.Tensor:
        tokens, max_query_len = bucket
        s = self.static
        attention = PagedAttention(self.kv_cache, s.metadata(tokens, max_query_len), self.model.exact)
        return self.model(s.ids[:tokens], positions=s.positions[:tokens], attention=attention, return_hidden=True,
                          plain_layers=True)

    def bucket_for(self, inputs) -> tuple[int, int] | None:
        return pick_bucket(self.buckets, inputs.num_tokens, inputs.max_query_len)

    def run(self, inputs, bucket: tuple[int, int]) -> torch.Tensor:
        """-> hidden [T, hidden_size] of the step's own tokens (a view of the graph's output: read it before
        the next replay)."""
        if (self.model.weight_version, self.model.exact) != (self.weight_version, self.exact):
            raise RuntimeError(f"CUDA graphs captured for weight version {self.weight_version} "
                               f"(exact={self.exact}) cannot run the model at version {self.model.weight_version} "
                               f"(exact={self.model.exact}): they read the old parameters; build a new ModelRunner")
        self.static.fill(inputs, bucket[0])
        self.replays[bucket] += 1
        if not self.capture:
            return self._step(bucket)[:inputs.num_tokens]
        self.graphs[bucket].replay()
        return self.outputs[bucket][:inputs.num_tokens]
