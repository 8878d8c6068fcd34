"""The model's attention hook during sampling: paged KV writes and paged attention, with explicit metadata."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from protege.kernels import dispatch as kernels
from protege.rollout.sampler.kv_cache import KVCache


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
