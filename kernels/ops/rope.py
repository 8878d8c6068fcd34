"""NeoX-style rotary embedding of q and k in one launch (Triton). The angles are the same fp32 numbers as the
reference's (positions as fp32 times the host-computed inv_freq); the rotation is in fp32, cast on store.
The backward is the inverse rotation (the same kernel with sin negated)."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from protege.kernels._validate import check_float_tensor, check_like
from protege.kernels.reference import rope_inv_freq


@triton.jit
def _rotate_heads(X, OUT, t, cos, sin, stride_t, stride_h, n_heads, head_dim, half,
                  BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < n_heads) & (d < half)
    src = X + t * stride_t + heads * stride_h + d
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
    dst = OUT + t * n_heads * head_dim + heads * head_dim + d
    tl.store(dst, (x1 * cos - x2 * sin).to(OUT.dtype.element_ty), mask=mask)
    tl.store(dst + half, (x2 * cos + x1 * sin).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q, K, Q_OUT, K_OUT, POS, INV_FREQ, stride_qt, stride_qh, stride_kt, stride_kh,
                 n_q_heads, n_k_heads, head_dim, SIGN: tl.constexpr, BLOCK_HQ: tl.constexpr,
                 BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per token: cos/sin computed once, applied to all of its q and k heads.
    t = tl.program_id(0).to(tl.int64)  # token x heads x head_dim can exceed 2**31
    half = head_dim // 2
    d = tl.arange(0, BLOCK_D)
    angle = tl.load(POS + t).to(tl.float32) * tl.load(INV_FREQ + d, mask=d < half, other=0.0)
    cos = tl.cos(angle)[None, :]
    sin = (SIGN * tl.sin(angle))[None, :]
    _rotate_heads(Q, Q_OUT, t, cos, sin, stride_qt, stride_qh, n_q_heads, head_dim, half, BLOCK_HQ, BLOCK_D)
    _rotate_heads(K, K_OUT, t, cos, sin, stride_kt, stride_kh, n_k_heads, head_dim, half, BLOCK_HK, BLOCK_D)


@functools.lru_cache(maxsize=16)
def _inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    return rope_inv_freq(head_dim, theta, device)


def _unit_stride_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _rotate(q, k, positions, theta, sign):
    """Rotated copies of q [T, Hq, D] and k [T, Hkv, D] (by -angle when sign is -1)."""
    q, k = _unit_stride_last(q), _unit_stride_last(k)
    n_tokens, n_q_heads, head_dim = q.shape
    n_k_heads = k.shape[1]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if n_tokens:
        _rope_kernel[(n_tokens,)](
            q, k, q_out, k_out, positions, _inv_freq(head_dim, theta, q.device), q.stride(0), q.stride(1),
            k.stride(0), k.stride(1), n_q_heads, n_k_heads, head_dim, SIGN=sign,
            BLOCK_HQ=triton.next_power_of_2(n_q_heads), BLOCK_HK=triton.next_power_of_2(n_k_heads),
            BLOCK_D=triton.next_power_of_2(head_dim // 2))
    return q_out, k_out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, positions, theta):
        ctx.save_for_backward(positions)
        ctx.theta = theta
        return _rotate(q, k, positions, theta, 1.0)

    @staticmethod
    def backward(ctx, dq, dk):
        (positions,) = ctx.saved_tensors
        dq, dk = _rotate(dq, dk, positions, ctx.theta, -1.0)
        return dq, dk, None, None


def apply_rope_triton(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float):
    """-> (rope(q), rope(k)) for q [T, Hq, D], k [T, Hkv, D] and integer positions [T]."""
    check_float_tensor("apply_rope", "q", q)
    check_like("apply_rope", "k", k, "q", q)
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"apply_rope: q and k must be [tokens, heads, head_dim], got shapes "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"apply_rope: k {tuple(k.shape)} does not match q {tuple(q.shape)} in tokens or head_dim")
    if q.shape[2] % 2 or q.shape[2] == 0:
        raise ValueError(f"apply_rope: head_dim must be even and positive, got {q.shape[2]}")
    if not isinstance(positions, torch.Tensor) or positions.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"apply_rope: positions must be an int32 or int64 tensor, got "
                        f"{getattr(positions, 'dtype', type(positions).__name__)}")
    if positions.shape != q.shape[:1]:
        raise ValueError(f"apply_rope: positions has shape {tuple(positions.shape)}; expected ({q.shape[0]},) "
                         "(one position per token)")
    if positions.device != q.device:
        raise ValueError(f"apply_rope: positions is on {positions.device} but q is on {q.device}")
    if not isinstance(theta, (int, float)) or not theta > 0:
        raise ValueError(f"apply_rope: theta must be a positive number, got {theta!r}")
    return _Rope.apply(q, k, positions.contiguous(), float(theta))
