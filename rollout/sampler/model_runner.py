"""Runs one scheduled step through the model over the paged KV cache: packs the chunks' tokens, builds the
attention metadata, and returns the final hidden state of every sequence that samples a token this step.

Host side, one C++ call (BlockManager.pack_step) writes the step's token ids, positions, KV slots, cu_seqlens,
context lengths and the block-table entries the device lacks into a host buffer, sent to the device in one
non-blocking copy (staging.py). Block tables live on the device, a row per running sequence, updated only
where a step changed them (new blocks, copy-on-write): the host work of a step grows with the batch and the
new tokens, not the context, and the step reads nothing back."""
from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels
from rollout.sampler.attention import AttentionMetadata, PagedAttention
from rollout.sampler.cuda_graphs import StepGraphs
from rollout.sampler.kv_cache import KVCache
from rollout.sampler.scheduler import Schedule
from rollout.sampler.staging import Staging


@dataclass
class StepInputs:
    """A step's inputs on the device (views of one uploaded buffer) and the host facts about it."""
    ids: torch.Tensor          # int64 [T]
    positions: torch.Tensor    # int64 [T]
    slots: torch.Tensor        # int64 [T], -1: already cached
    cu_seqlens: torch.Tensor   # int32 [B+1]
    context_lens: torch.Tensor # int32 [B]
    tables: torch.Tensor       # int32 [B, width]
    last_rows: torch.Tensor    # int64 [S]: the hidden row each sampling sequence reads (forks share one)
    copies: torch.Tensor       # int64 [2, C]: copy-on-write block copies (src; dst) to do first
    max_query_len: int

    @property
    def num_tokens(self) -> int:
        return self.ids.numel()

    @property
    def num_seqs(self) -> int:
        return self.context_lens.numel()


class ModelRunner:
    def __init__(self, model, kv_cache: KVCache, block_manager, max_blocks_per_seq: int,
                 cuda_graph_sizes: tuple[int, ...] = (), max_num_seqs: int = 256, graph_max_query_len: int = 64):
        """cuda_graph_sizes: batch sizes of the step graphs (cuda_graphs.py; steps with up to
        graph_max_query_len tokens per sequence replay one), on the Triton path. On the CPU (no CUDA graphs)
        the graph path runs eagerly through the same padded buffers: used by the tests."""
        self.model, self.kv_cache, self.block_manager = model, kv_cache, block_manager
        self.device = kv_cache.pool.device
        self.table_rows = torch.zeros(max_num_seqs, max_blocks_per_seq, dtype=torch.int32, device=self.device)
        self.free_rows = list(range(max_num_seqs - 1, -1, -1))
        self.row_of: dict[int, int] = {}            # seq id -> its row of table_rows
        self.staging = Staging(self.device)
        self.graphs = None
        if cuda_graph_sizes and kernels.use_triton(kv_cache.pool):
            self.graphs = StepGraphs(model, kv_cache, max_blocks_per_seq, cuda_graph_sizes, graph_max_query_len,
                                     capture=self.device.type == "cuda")

    def forget(self, seq) -> None:
        """The sequence gave its blocks back (finished or preempted): its row is free."""
        row = self.row_of.pop(seq.seq_id, None)
        if row is not None:
            self.free_rows.append(row)

    def prepare(self, schedule: Schedule) -> StepInputs:
        """Host side: the step's inputs packed and sent to the device (no wait), device block tables updated.
        A chunk that samples gives its last row once for itself and once per fork it spawns this step."""
        seq_ids, starts, stops, write_froms, rows, last_rows = [], [], [], [], [], []
        n_tokens = max_query_len = 0
        for chunk in schedule.chunks:
            seq = chunk.seq
            row = self.row_of.get(seq.seq_id)
            if row is None:
                row = self.row_of[seq.seq_id] = self.free_rows.pop()
            seq_ids.append(seq.seq_id)
            starts.append(chunk.start)
            stops.append(chunk.stop)
            write_froms.append(chunk.write_from)
            rows.append(row)
            n = chunk.stop - chunk.start
            n_tokens += n
            max_query_len = max(max_query_len, n)
            if chunk.stop == seq.num_tokens:   # chunk.samples
                last_rows += [n_tokens - 1] * (1 + seq.forks_left)
        copies = [block for pair in zip(*schedule.copies) for block in pair] if schedule.copies else []
        reserve = len(last_rows) + len(copies)
        buffer = self.staging.reserve(3 * n_tokens + 3 * len(rows) + 1 + reserve)
        n_changes, width = self.block_manager.pack_step(seq_ids, starts, stops, write_froms, rows, buffer, reserve)
        if n_changes < 0:   # more table entries than the buffer holds (sequences admitted): grow it once
            buffer = self.staging.reserve(-n_changes)
            n_changes, width = self.block_manager.pack_step(seq_ids, starts, stops, write_froms, rows, buffer,
                                                            reserve)
        end = 3 * n_tokens + 3 * len(rows) + 1 + 3 * n_changes
        buffer[end:end + len(last_rows)] = last_rows
        buffer[end + len(last_rows):end + reserve] = copies
        packed = self.staging.upload(end + reserve)
        ids, positions, slots, cu, contexts, row_ids, changes, last, copy_pairs = packed.split(
            [n_tokens, n_tokens, n_tokens, len(rows) + 1, len(rows), len(rows), 3 * n_changes, len(last_rows),
             len(copies)])
        if n_changes:
            r, c, b = changes.view(-1, 3).t()
            self.table_rows[r, c] = b.to(torch.int32)
        return StepInputs(ids, positions, slots, cu.to(torch.int32), contexts.to(torch.int32),
                          self.table_rows[row_ids][:, :width], last, copy_pairs.view(2, -1), max_query_len)

    @torch.inference_mode()
    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """Device side: -> hidden [S, hidden_size], inputs.last_rows of the step's hidden states."""
        self.kv_cache.copy_blocks(inputs.copies)
        bucket = self.graphs.bucket_for(inputs) if self.graphs is not None else None
        if bucket is not None:
            hidden = self.graphs.run(inputs, bucket)
        else:
            metadata = AttentionMetadata(inputs.slots, inputs.tables, inputs.cu_seqlens, inputs.context_lens,
                                         inputs.max_query_len)
            hidden = self.model(inputs.ids, positions=inputs.positions,
                                attention=PagedAttention(self.kv_cache, metadata, self.model.exact),
                                return_hidden=True)
        return hidden[inputs.last_rows]
