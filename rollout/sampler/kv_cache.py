"""The paged KV pool: per layer, keys and values in fixed-size blocks [num_blocks, block_size, Hkv, D]."""
from __future__ import annotations

import torch

from protege.engine.config import ModelConfig


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Keys and values of `block_size` tokens in every layer."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * config.head_dim * itemsize


class KVCache:
    """One allocation for all layers (k and v views per layer). Zero-filled, so padded rows of a CUDA-graph
    batch read finite values. release() frees it (for the training phase); build a new one afterwards."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"KV cache: num_blocks={num_blocks} and block_size={block_size} must be positive")
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (2, config.num_hidden_layers, num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        self.pool: torch.Tensor | None = torch.zeros(shape, dtype=dtype, device=device)

    def _check(self) -> torch.Tensor:
        if self.pool is None:
            raise RuntimeError("the KV cache was released; create a new one")
        return self.pool

    def keys(self, layer: int) -> torch.Tensor:
        return self._check()[0, layer]

    def values(self, layer: int) -> torch.Tensor:
        return self._check()[1, layer]

    def copy_blocks(self, copies: torch.Tensor) -> None:
        """Copy-on-write: block copies[0, i]'s keys and values to block copies[1, i], in every layer
        (copies: int64 [2, C] on the pool's device)."""
        if copies.numel() == 0:
            return
        pool = self._check()
        pool[:, :, copies[1]] = pool[:, :, copies[0]]

    def release(self) -> None:
        self.pool = None
