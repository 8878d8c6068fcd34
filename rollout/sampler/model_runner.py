"""Runs one scheduled step through the model over the paged KV cache: packs the chunks' tokens, builds the
attention metadata, and returns the final hidden state of every sequence that samples a token this step.

Block tables live on the device, a row per running sequence, updated only where a step changed them (new
blocks, copy-on-write): the host work of a step grows with the batch and the new tokens, not the context."""
from __future__ import annotations

import torch

import kernels
from rollout.sampler.attention import AttentionMetadata, PagedAttention
from rollout.sampler.cuda_graphs import DecodeGraphs
from rollout.sampler.kv_cache import KVCache
from rollout.sampler.scheduler import Schedule


class ModelRunner:
    def __init__(self, model, kv_cache: KVCache, block_manager, max_blocks_per_seq: int,
                 cuda_graph_sizes: tuple[int, ...] = (), max_num_seqs: int = 256):
        self.model, self.kv_cache, self.block_manager = model, kv_cache, block_manager
        self.device = kv_cache.pool.device
        self.table_rows = torch.zeros(max_num_seqs, max_blocks_per_seq, dtype=torch.int32, device=self.device)
        self.free_rows = list(range(max_num_seqs - 1, -1, -1))
        self.row_of: dict[int, int] = {}            # seq id -> its row of table_rows
        self.tables: dict[int, list[int]] = {}      # seq id -> the host copy of its block table
        self.decode_graphs = None
        if cuda_graph_sizes and self.device.type == "cuda" and kernels.use_triton(kv_cache.pool):
            self.decode_graphs = DecodeGraphs(model, kv_cache, max_blocks_per_seq, cuda_graph_sizes)

    def forget(self, seq) -> None:
        """The sequence gave its blocks back (finished or preempted): its row is free."""
        row = self.row_of.pop(seq.seq_id, None)
        if row is not None:
            self.free_rows.append(row)
            del self.tables[seq.seq_id]

    def _sync_table(self, seq_id: int, first: int, changes: list[tuple[int, int, int]]) -> list[int]:
        """The host copy of a sequence's table, refreshed from entry `first` on; the device entries that
        differ are queued in `changes` as (row, column, block). A new sequence's whole row is written now."""
        table = self.tables.get(seq_id)
        if table is None:
            row = self.row_of[seq_id] = self.free_rows.pop()
            table = self.tables[seq_id] = self.block_manager.block_table(seq_id)
            self.table_rows[row, :len(table)] = torch.tensor(table, dtype=torch.int32)
            return table
        row = self.row_of[seq_id]
        for i, block in enumerate(self.block_manager.block_table(seq_id, first), start=first):
            if i == len(table):
                table.append(block)
            elif table[i] == block:
                continue
            table[i] = block
            changes.append((row, i, block))
        return table

    def prepare(self, schedule: Schedule):
        """Host side: the step's packed inputs and attention metadata, as Python lists, and the device block
        tables brought up to date."""
        block_size = self.kv_cache.block_size
        ids, positions, slots, rows, cu, contexts, last_rows, changes = [], [], [], [], [0], [], [], []
        width = 1
        for chunk in schedule.chunks:
            seq = chunk.seq
            table = self._sync_table(seq.seq_id, chunk.write_from // block_size, changes)
            ids.extend(seq.token_ids[chunk.start:chunk.stop])
            positions.extend(range(chunk.start, chunk.stop))
            slots.extend([-1] * (chunk.write_from - chunk.start))
            slots.extend(table[p // block_size] * block_size + p % block_size
                         for p in range(chunk.write_from, chunk.stop))
            rows.append(self.row_of[seq.seq_id])
            width = max(width, len(table))
            cu.append(cu[-1] + chunk.stop - chunk.start)
            contexts.append(chunk.stop)
            if chunk.samples:
                last_rows.append(cu[-1] - 1)
        if changes:   # one small host-to-device copy for every table entry the step changed
            r, c, b = torch.tensor(changes, dtype=torch.int32).t()
            self.table_rows[r.to(self.device, torch.int64), c.to(self.device, torch.int64)] = b.to(self.device)
        tables = self.table_rows[torch.tensor(rows, device=self.device)][:, :width]
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

            metadata = AttentionMetadata(tensor(slots, torch.int64), tables,
                                         tensor(cu, torch.int32), tensor(contexts, torch.int32), max_query_len)
            hidden = self.model(tensor(ids, torch.int64), positions=tensor(positions, torch.int64),
                                attention=PagedAttention(self.kv_cache, metadata, self.model.exact),
                                return_hidden=True)
        return hidden[torch.tensor(last_rows, device=self.device, dtype=torch.int64)]
