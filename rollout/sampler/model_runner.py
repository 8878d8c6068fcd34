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

from protege.kernels import dispatch as kernels
from protege.rollout.sampler.attention import AttentionMetadata, PagedAttention
from protege.rollout.sampler.cuda_graphs import StepGraphs
from protege.rollout.sampler.kv_cache import KVCache
from protege.rollout.sampler.scheduler import Schedule
from protege.rollout.sampler.staging import Staging


@dataclass
class PackedStep:
    """What prepare hands to forward: the step's inputs uploaded in one buffer (BlockManager.pack_step's
    layout) and the host facts about them."""
    packed: torch.Tensor   # int64, on the device
    sizes: list[int]       # its parts' lengths: ids, positions, slots, cu_seqlens, context lens, rows, last
                           # rows, copies, table entries
    width: int             # the widest block table of the step
    max_query_len: int
    num_tokens: int


@dataclass
class StepInputs:
    """A step's inputs on the device (views of the uploaded buffer, and the block tables gathered)."""
    ids: torch.Tensor          # int64 [T]
    positions: torch.Tensor    # int64 [T]
    slots: torch.Tensor        # int64 [T], -1: already cached
    cu_seqlens: torch.Tensor   # int32 [B+1]
    context_lens: torch.Tensor  # int32 [B]
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

    def prepare(self, schedule: Schedule) -> PackedStep:
        """Host side: the step's inputs packed and sent to the device (no wait). A chunk that samples gives
        its last row once for itself and once per fork it spawns this step."""
        rows = [self.row_of.get(i) for i in schedule.seq_ids]
        if None in rows:   # sequences the runner meets for the first time
            for k, seq_id in enumerate(schedule.seq_ids):
                if rows[k] is None:
                    rows[k] = self.row_of[seq_id] = self.free_rows.pop()
        samples = [1 + s.forks_left for s in schedule.seqs]
        args = (schedule.seq_ids, schedule.starts, schedule.stops, schedule.write_froms, rows, samples,
                schedule.copies)
        n_tokens, n_seqs, n_copies = schedule.num_tokens, len(rows), len(schedule.copies)
        size, n_samples, n_changes, width = self.block_manager.pack_step(
            *args, self.staging.reserve(3 * n_tokens + 4 * n_seqs + 1 + 2 * n_copies))
        if size < 0:   # block-table entries of new sequences overflow the buffer: grow it
            size, n_samples, n_changes, width = self.block_manager.pack_step(*args, self.staging.reserve(-size))
        sizes = [n_tokens, n_tokens, n_tokens, n_seqs + 1, n_seqs, n_seqs, n_samples, 2 * n_copies, 3 * n_changes]
        return PackedStep(self.staging.upload(size), sizes, width,
                          max(map(int.__sub__, schedule.stops, schedule.starts)), n_tokens)

    def unpack(self, step: PackedStep) -> StepInputs:
        """Device side: the block-table entries the step changed written into the device rows, the step's
        tables gathered from them, views of the rest."""
        ids, positions, slots, cu, contexts, rows, last_rows, copies, changes = step.packed.split(step.sizes)
        if changes.numel():
            r, c, b = changes.view(-1, 3).t()
            self.table_rows[r, c] = b.to(torch.int32)
        return StepInputs(ids, positions, slots, cu.to(torch.int32), contexts.to(torch.int32),
                          self.table_rows[:, :step.width][rows], last_rows, copies.view(2, -1), step.max_query_len)

    @torch.inference_mode()
    def forward(self, step: PackedStep) -> torch.Tensor:
        """Device side: -> hidden [S, hidden_size], the step's last_rows of its hidden states."""
        inputs = self.unpack(step)
        self.kv_cache.copy_blocks(inputs.copies)
        bucket = self.graphs.bucket_for(inputs) if self.graphs is not None else None
        if bucket is not None:
            hidden = self.graphs.run(inputs, bucket)
        else:
            metadata = AttentionMetadata(inputs.slots, inputs.tables, inputs.cu_seqlens, inputs.context_lens,
                                         inputs.max_query_len)
            # Plain layer forwards: the weights are plain and fixed while the sampler runs (it refuses sharded
            # ones), so FSDP2's per-layer hooks have nothing to do, and a checkpoint wrapper would only cost
            # (and read the CUDA RNG state, which a graph capture refuses).
            hidden = self.model(inputs.ids, positions=inputs.positions,
                                attention=PagedAttention(self.kv_cache, metadata, self.model.exact),
                                return_hidden=True, plain_layers=True)
        return hidden[inputs.last_rows]
