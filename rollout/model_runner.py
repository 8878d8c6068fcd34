"""Runs one scheduled step through the model over the paged KV cache: packs the chunks' tokens, builds the
attention metadata, and returns the final hidden state of every sequence that samples a token this step."""
from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels
from rollout.kv_cache import KVCache
from rollout.scheduler import Schedule


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor   # int64 [T]: cache slot of each new token's k/v, -1: already cached
    block_tables: torch.Tensor   # int32 [B, max_blocks]
    cu_seqlens_q: torch.Tensor   # int32 [B+1]: the new tokens of sequence b are rows cu[b]:cu[b+1]
    context_lens: torch.Tensor   # int32 [B]: tokens of sequence b once this step's are added
    max_query_len: int


class PagedAttention:
    """The model's attention hook for one step: layer i writes the new k/v into its cache slots, then the
    new queries attend to everything cached for their sequence (prefix and new tokens)."""

    def __init__(self, kv_cache: KVCache, metadata: AttentionMetadata, match_training: bool):
        # match_training: attention tiled as in training, so rows equal the trainer's bit for bit (worth it
        # only when the model's projections are batch-invariant too: model.exact).
        self.kv_cache, self.metadata, self.match_training = kv_cache, metadata, match_training

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        m = self.metadata
        k_cache, v_cache = self.kv_cache.keys(layer_idx), self.kv_cache.values(layer_idx)
        kernels.write_kv_cache(k, v, k_cache, v_cache, m.slot_mapping)
        return kernels.paged_attention(q, k_cache, v_cache, m.block_tables, m.cu_seqlens_q, m.context_lens,
                                       m.max_query_len, match_training=self.match_training)


class ModelRunner:
    def __init__(self, model, kv_cache: KVCache, block_manager, max_blocks_per_seq: int,
                 cuda_graph_sizes: tuple[int, ...] = ()):
        self.model, self.kv_cache, self.block_manager = model, kv_cache, block_manager
        self.device = kv_cache.pool.device
        self.decode_graphs = None
        if cuda_graph_sizes and self.device.type == "cuda" and kernels.use_triton(kv_cache.pool):
            self.decode_graphs = DecodeGraphs(model, kv_cache, max_blocks_per_seq, cuda_graph_sizes)

    def prepare(self, schedule: Schedule):
        """Host side: the step's packed inputs and attention metadata, as Python lists."""
        block_size = self.kv_cache.block_size
        ids, positions, slots, tables, cu, contexts, last_rows = [], [], [], [], [0], [], []
        for chunk in schedule.chunks:
            seq = chunk.seq
            table = self.block_manager.block_table(seq.seq_id)
            ids.extend(seq.token_ids[chunk.start:chunk.stop])
            positions.extend(range(chunk.start, chunk.stop))
            slots.extend([-1] * (chunk.write_from - chunk.start))
            slots.extend(table[p // block_size] * block_size + p % block_size
                         for p in range(chunk.write_from, chunk.stop))
            tables.append(table)
            cu.append(cu[-1] + chunk.stop - chunk.start)
            contexts.append(chunk.stop)
            if chunk.samples:
                last_rows.append(cu[-1] - 1)
        width = max(len(t) for t in tables)
        tables = [t + [0] * (width - len(t)) for t in tables]
        return schedule.copies, ids, positions, slots, tables, cu, contexts, last_rows

    @torch.inference_mode()
    def forward(self, copies, ids, positions, slots, tables, cu, contexts, last_rows) -> torch.Tensor:
        """Device side: -> hidden [S, hidden_size], the last row of each chunk that samples, in chunk order."""
        self.kv_cache.copy_blocks(copies)
        max_query_len = max(b - a for a, b in zip(cu[:-1], cu[1:]))
        if self.decode_graphs is not None and max_query_len == 1 and len(ids) <= self.decode_graphs.max_batch:
            hidden = self.decode_graphs.run(ids, positions, slots, tables, contexts)
        else:
            def tensor(values, dtype):
                return torch.tensor(values, dtype=dtype, device=self.device)

            metadata = AttentionMetadata(tensor(slots, torch.int64), tensor(tables, torch.int32),
                                         tensor(cu, torch.int32), tensor(contexts, torch.int32), max_query_len)
            hidden = self.model(tensor(ids, torch.int64), positions=tensor(positions, torch.int64),
                                attention=PagedAttention(self.kv_cache, metadata, self.model.exact),
                                return_hidden=True)
        return hidden[torch.tensor(last_rows, device=self.device, dtype=torch.int64)]


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
        width = len(tables[0])
        self.ids[:n] = torch.tensor(ids)
        self.positions[:n] = torch.tensor(positions)
        self.slots[:bs] = -1
        self.slots[:n] = torch.tensor(slots)
        self.tables[:n, :width] = torch.tensor(tables, dtype=torch.int32)
        self.contexts[:bs] = 1
        self.contexts[:n] = torch.tensor(contexts, dtype=torch.int32)
        self.graphs[bs].replay()
        return self.outputs[bs][:n]
