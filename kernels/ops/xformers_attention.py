"""Varlen attention through xformers' memory-efficient attention (optional; PROTEGE_ATTENTION=xformers on CUDA).

The packed sequences are one batch row with a block-diagonal (causal) mask over the pack; GQA goes through
xformers' grouped layout [1, T, Hkv, group, D] with K/V broadcast over the group (stride 0, no copy). xformers
is imported lazily and never required (it has no CPU kernels); it does not promise the engine's packing
invariance (a token's output may depend on what else is in the pack)."""
from __future__ import annotations

import torch


def _xformers():
    try:
        from xformers.ops import fmha
    except ImportError as e:
        raise ImportError("PROTEGE_ATTENTION=xformers but the xformers package is not importable "
                          "(pip install xformers: CUDA wheels only), or unset PROTEGE_ATTENTION for the "
                          "engine's Triton kernels") from e
    return fmha


def xformers_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                              causal: bool = True, softmax_scale: float | None = None) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens int32 [B+1] -> [T, Hq, D], each sequence attending to itself."""
    fmha = _xformers()
    if not q.is_cuda:
        raise ValueError("xformers attention needs CUDA tensors (xformers has no CPU kernels)")
    n_tokens, n_heads, head_dim = q.shape
    n_kv = k.shape[1]
    group = n_heads // n_kv
    seqlens = cu_seqlens.diff().tolist()
    mask_type = fmha.attn_bias.BlockDiagonalCausalMask if causal else fmha.attn_bias.BlockDiagonalMask
    bias = mask_type.from_seqlens(seqlens)
    q5 = q.reshape(1, n_tokens, n_kv, group, head_dim)
    k5 = k[None, :, :, None, :].expand(1, n_tokens, n_kv, group, head_dim)
    v5 = v[None, :, :, None, :].expand(1, n_tokens, n_kv, group, head_dim)
    out = fmha.memory_efficient_attention(q5, k5, v5, attn_bias=bias, scale=softmax_scale)
    return out.reshape(n_tokens, n_heads, head_dim)
