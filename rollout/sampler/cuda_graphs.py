"""CUDA graphs of the decode step, captured per batch-size bucket on the KV pool and the model's weights."""
from __future__ import annotations

import torch

from rollout.sampler.attention import AttentionMetadata, PagedAttention
from rollout.sampler.kv_cache import KVCache


class DecodeGraphs:
    """CUDA graphs of a decode step (one token per sequence) at bucketed batch sizes: a batch is padded to the
    next captured size with rows that write nothing (slot -1) and attend to one cached key. Triton path only
    (the PyTorch reference path reads metadata on the host)."""

    def __init__(self, model, kv_cache: KVCache, max_blocks_per_seq: int, sizes: tuple[int, ...]):
        self.sizes = sorted(set(sizes))
        self.max_batch = self.sizes[-1]
        device = kv_cache.pool.device
        n = self.max_batch
        self.ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slots = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.tables = torch.zeros((n, max_blocks_per_seq), dtype=torch.int32, device=device)
        self.contexts = torch.ones(n, dtype=torch.int32, device=device)
        cu = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs, self.outputs = {}, {}
        pool = None
        for bs in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory pool
            metadata = AttentionMetadata(self.slots[:bs], self.tables[:bs], cu[:bs + 1], self.contexts[:bs], 1)
            attention = PagedAttention(kv_cache, metadata, model.exact)

            def step(bs=bs, attention=attention):
                return model(self.ids[:bs], positions=self.positions[:bs], attention=attention, return_hidden=True)

            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.inference_mode():
                step()  # compiles the kernels outside the capture
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool), torch.inference_mode():
                self.outputs[bs] = step()
            pool = graph.pool()
            self.graphs[bs] = graph

    def run(self, ids, positions, slots, tables, contexts) -> torch.Tensor:
        n = len(ids)
        bs = next(s for s in self.sizes if s >= n)
        width = tables.shape[1]
        self.ids[:n] = torch.tensor(ids)
        self.positions[:n] = torch.tensor(positions)
        self.slots[:bs] = -1
        self.slots[:n] = torch.tensor(slots)
        self.tables[:n, :width] = tables
        self.contexts[:bs] = 1
        self.contexts[:n] = torch.tensor(contexts, dtype=torch.int32)
        self.graphs[bs].replay()
        return self.outputs[bs][:n]
