"""Runs one scheduled step through the model over the paged KV cache: packs the chunks' tokens, builds the
attention metadata, and returns the final hidden state of every sequence that samples a token this step."""
from __future__ import annotations

import torch

import kernels
from rollout.sampler.attention import AttentionMetadata, PagedAttention
from rollout.sampler.cuda_graphs import DecodeGraphs
from rollout.sampler.kv_cache import KVCache
from rollout.sampler.scheduler import Schedule


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
