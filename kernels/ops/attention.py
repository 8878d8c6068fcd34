"""Varlen attention over packed sequences, FlashAttention-2 style, in Triton: forward and backward.

q [T, Hq, D], k/v [T, Hkv, D] hold B sequences back to back (cu_seqlens int32 [B+1]); each sequence attends
only to itself (causally or not). GQA reads kv head `h // (Hq // Hkv)` in place (no repeat in memory).

Batch invariance: a program owns one query (or key) block of one sequence and one head; its tiles start at
the sequence start, its loop runs in a fixed order over that sequence only, and the tile sizes are constants
(never tuned on the number of tokens). So a token's output and gradients are bit-identical whether its
sequence is packed alone or with others -- the sampler and the trainer rely on it. The backward has no atomics:
dK/dV programs sum over the query heads of their group in a fixed order, dQ has its own kernel.

Numerics: fp32 accumulation and softmax statistics, softmax in base 2 with log2(e) folded into the scale, the
row logsumexp (base 2) saved for the backward. Under the CPU interpreter (and for fp32 inputs) tiles are upcast
to fp32 right after tl.load and tl.dot runs in exact fp32 (the interpreter's bf16 is broken); on a GPU, 16-bit
tiles go through tl.dot in their own dtype (tensor cores; P and dS rounded to it, as in FlashAttention-2).

PROTEGE_ATTENTION=flash_attn selects the flash-attn package, PROTEGE_ATTENTION=xformers xformers' memory-efficient
attention with a block-diagonal causal mask over the pack (kernels/ops/xformers_attention.py), for CUDA tensors
(imported lazily, optional; neither promises the packing invariance above). CPU tensors always use the Triton
kernels.
"""
from __future__ import annotations

import math
import os
import weakref

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from protege.kernels._validate import INTERPRETING, check_float_tensor, check_like

_DOT_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_BACKENDS = ("triton", "flash_attn", "xformers")


@triton.jit
def _load_rows(base, rows, n_rows, stride_t, offs_d, HEAD_DIM: tl.constexpr, DTYPE: tl.constexpr):
    """Rows `rows` (< n_rows) of a [*, HEAD_DIM] slab with token stride `stride_t`, as DTYPE; zeros elsewhere."""
    ptrs = base + rows.to(tl.int64)[:, None] * stride_t + offs_d[None, :]
    mask = (rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :]
    return tl.load(ptrs, mask=mask, other=0.0).to(DTYPE)


@triton.jit
def _store_rows(base, rows, n_rows, stride_t, offs_d, value, HEAD_DIM: tl.constexpr):
    ptrs = base + rows.to(tl.int64)[:, None] * stride_t + offs_d[None, :]
    mask = (rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_kv_loop(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, rows, offs_d, seq_len, lo, hi,
                 qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                 CAUSAL: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over the key blocks [lo, hi); MASKED blocks may cross the diagonal or the sequence end."""
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, cols, seq_len, stride_kt, offs_d, HEAD_DIM, DOT)
        v = _load_rows(v_base, cols, seq_len, stride_vt, offs_d, HEAD_DIM, DOT)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:
            keep = (cols < seq_len)[None, :]
            if CAUSAL:
                keep = keep & (rows[:, None] >= cols[None, :])
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, CU_SEQLENS, qk_scale, n_tokens,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                     GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                     DOT: tl.constexpr, PRECISION: tl.constexpr):
    # One program: query block pid(0) of sequence pid(2), query head pid(1).
    m0 = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    seq = tl.program_id(2)
    seq_start = tl.load(CU_SEQLENS + seq).to(tl.int64)
    seq_len = (tl.load(CU_SEQLENS + seq + 1) - seq_start).to(tl.int32)
    if m0 >= seq_len:
        return
    kv_head = head // GROUP
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + seq_start * stride_qt + head * stride_qh
    q = _load_rows(q_base, rows, seq_len, stride_qt, offs_d, HEAD_DIM, DOT)
    k_base = K + seq_start * stride_kt + kv_head * stride_kh
    v_base = V + seq_start * stride_vt + kv_head * stride_vh

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    # Key blocks entirely below the diagonal (causal) or inside the sequence need no mask; the rest do.
    if CAUSAL:
        full_end = m0
        end = tl.minimum(m0 + BLOCK_M, seq_len)
    else:
        full_end = (seq_len // BLOCK_N) * BLOCK_N
        end = seq_len
    acc, l_i, m_i = _fwd_kv_loop(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, rows, offs_d, seq_len,
                                 0, full_end, qk_scale, HEAD_DIM, BLOCK_N, False, CAUSAL, DOT, PRECISION)
    acc, l_i, m_i = _fwd_kv_loop(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, rows, offs_d, seq_len,
                                 full_end, end, qk_scale, HEAD_DIM, BLOCK_N, True, CAUSAL, DOT, PRECISION)

    _store_rows(O + seq_start * stride_ot + head * stride_oh, rows, seq_len, stride_ot, offs_d,
                acc / l_i[:, None], HEAD_DIM)
    lse_ptrs = LSE + head.to(tl.int64) * n_tokens + seq_start + rows
    tl.store(lse_ptrs, m_i + tl.log2(l_i), mask=rows < seq_len)


@triton.jit
def _attn_bwd_delta_kernel(O, DO, DELTA, n_tokens, stride_ot, stride_oh, stride_dot, stride_doh,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[h, t] = sum_d dO * O: the row term of the softmax backward."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    head = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(O + head * stride_oh, rows, n_tokens, stride_ot, offs_d, HEAD_DIM, tl.float32)
    do = _load_rows(DO + head * stride_doh, rows, n_tokens, stride_dot, offs_d, HEAD_DIM, tl.float32)
    tl.store(DELTA + head.to(tl.int64) * n_tokens + rows, tl.sum(o * do, 1), mask=rows < n_tokens)


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU_SEQLENS, qk_scale, sm_scale, n_tokens,
                          stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                          stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                          GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                          DOT: tl.constexpr, PRECISION: tl.constexpr):
    # One program: key block pid(0) of sequence pid(2), kv head pid(1), summed over the GROUP query heads.
    n0 = tl.program_id(0) * BLOCK_N
    kv_head = tl.program_id(1)
    seq = tl.program_id(2)
    seq_start = tl.load(CU_SEQLENS + seq).to(tl.int64)
    seq_len = (tl.load(CU_SEQLENS + seq + 1) - seq_start).to(tl.int32)
    if n0 >= seq_len:
        return
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k_base = K + seq_start * stride_kt + kv_head * stride_kh
    v_base = V + seq_start * stride_vt + kv_head * stride_vh
    k = _load_rows(k_base, cols, seq_len, stride_kt, offs_d, HEAD_DIM, DOT)
    v = _load_rows(v_base, cols, seq_len, stride_vt, offs_d, HEAD_DIM, DOT)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        lo = (n0 // BLOCK_M) * BLOCK_M  # queries before the key block never see it
    else:
        lo = 0
    for g in range(GROUP):  # fixed order: the group's heads sum deterministically
        head = kv_head * GROUP + g
        q_base = Q + seq_start * stride_qt + head * stride_qh
        do_base = DO + seq_start * stride_dot + head * stride_doh
        row_base = head.to(tl.int64) * n_tokens + seq_start
        for m0 in range(lo, seq_len, BLOCK_M):
            rows = m0 + offs_m
            q = _load_rows(q_base, rows, seq_len, stride_qt, offs_d, HEAD_DIM, DOT)
            do = _load_rows(do_base, rows, seq_len, stride_dot, offs_d, HEAD_DIM, DOT)
            lse = tl.load(LSE + row_base + rows, mask=rows < seq_len, other=0.0)
            delta = tl.load(DELTA + row_base + rows, mask=rows < seq_len, other=0.0)
            # Transposed tiles [BLOCK_N, BLOCK_M]: keys along rows, queries along columns.
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
            keep = (rows < seq_len)[None, :]
            if CAUSAL:
                keep = keep & (rows[None, :] >= cols[:, None])
            p_t = tl.where(keep, tl.exp2(s_t - lse[None, :]), 0.0)
            dv += tl.dot(p_t.to(DOT), do, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(DOT), q, input_precision=PRECISION)
    _store_rows(DK + seq_start * stride_dkt + kv_head * stride_dkh, cols, seq_len, stride_dkt, offs_d,
                dk * sm_scale, HEAD_DIM)
    _store_rows(DV + seq_start * stride_dvt + kv_head * stride_dvh, cols, seq_len, stride_dvt, offs_d,
                dv, HEAD_DIM)


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU_SEQLENS, qk_scale, sm_scale, n_tokens,
                        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                        stride_dot, stride_doh, stride_dqt, stride_dqh,
                        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                        DOT: tl.constexpr, PRECISION: tl.constexpr):
    # One program: query block pid(0) of sequence pid(2), query head pid(1).
    m0 = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    seq = tl.program_id(2)
    seq_start = tl.load(CU_SEQLENS + seq).to(tl.int64)
    seq_len = (tl.load(CU_SEQLENS + seq + 1) - seq_start).to(tl.int32)
    if m0 >= seq_len:
        return
    kv_head = head // GROUP
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + seq_start * stride_qt + head * stride_qh
    do_base = DO + seq_start * stride_dot + head * stride_doh
    q = _load_rows(q_base, rows, seq_len, stride_qt, offs_d, HEAD_DIM, DOT)
    do = _load_rows(do_base, rows, seq_len, stride_dot, offs_d, HEAD_DIM, DOT)
    row_base = head.to(tl.int64) * n_tokens + seq_start
    lse = tl.load(LSE + row_base + rows, mask=rows < seq_len, other=0.0)
    delta = tl.load(DELTA + row_base + rows, mask=rows < seq_len, other=0.0)
    k_base = K + seq_start * stride_kt + kv_head * stride_kh
    v_base = V + seq_start * stride_vt + kv_head * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        end = tl.minimum(m0 + BLOCK_M, seq_len)
    else:
        end = seq_len
    for n0 in range(0, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, cols, seq_len, stride_kt, offs_d, HEAD_DIM, DOT)
        v = _load_rows(v_base, cols, seq_len, stride_vt, offs_d, HEAD_DIM, DOT)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        keep = (cols < seq_len)[None, :]
        if CAUSAL:
            keep = keep & (rows[:, None] >= cols[None, :])
        p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(DOT), k, input_precision=PRECISION)
    _store_rows(DQ + seq_start * stride_dqt + head * stride_dqh, rows, seq_len, stride_dqt, offs_d,
                dq * sm_scale, HEAD_DIM)


# The forward compiled without multiply-add contraction: its unmasked key blocks would otherwise fuse
# s * scale - max into one rounding, its masked ones (and the paged kernel's) not, and the sampler's exact-mode
# rows would differ from the trainer's in the last fp32 bit (seen on an H200: bf16 outputs flipped now and then).
SAME_ROUNDING = {"enable_fp_fusion": False}


def _tiles(head_dim: int, dtype: torch.dtype, on_gpu: bool) -> dict:
    """Fixed tile sizes (never a function of the token count: batch invariance). The interpreter gets small
    tiles so that tests cross block boundaries with tiny shapes. The GPU values follow the Triton
    fused-attention tutorial's H100 choices (fp32, the exact-numerics path, gets half-size tiles to fit in
    shared memory); they are not tuned here."""
    if not on_gpu:
        return dict(fwd=(32, 16), dkdv=(16, 32), dq=(32, 16), launch={})
    launch = dict(num_warps=8 if head_dim > 64 else 4, num_stages=3)
    if dtype == torch.float32:
        return dict(fwd=(64, 32), dkdv=(32, 64), dq=(64, 32), launch=dict(launch, num_stages=2))
    return dict(fwd=(128, 64), dkdv=(32, 128), dq=(128, 32), launch=launch)


def _check_inputs(q, k, v, cu_seqlens, max_seqlen) -> int:
    """Validate the call; return the longest sequence length."""
    where = "varlen_attention"
    check_float_tensor(where, "q", q)
    check_like(where, "k", k, "q", q)
    check_like(where, "v", v, "q", q)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{where}: {name} must be [tokens, heads, head_dim], got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"{where}: k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"{where}: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in tokens and head_dim")
    if q.shape[2] == 0 or k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{where}: query heads ({q.shape[1]}) must be a positive multiple of kv heads "
                         f"({k.shape[1]}) and head_dim ({q.shape[2]}) positive")
    if cu_seqlens.device != q.device:
        raise ValueError(f"{where}: cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{where}: cu_seqlens must be a 1-D int32 tensor [B+1], got dtype {cu_seqlens.dtype} "
                         f"shape {tuple(cu_seqlens.shape)}")
    longest = _longest_sequence(cu_seqlens, q.shape[0], where)
    if max_seqlen is not None and max_seqlen < longest:
        raise ValueError(f"{where}: max_seqlen={max_seqlen} is shorter than the longest sequence ({longest})")
    return longest


_last_checked: tuple = (None, None, None)  # (weak ref to cu_seqlens, its version and token count, longest)


def _longest_sequence(cu_seqlens: torch.Tensor, n_tokens: int, where: str) -> int:
    """Validate cu_seqlens and return the longest sequence. Reading it costs a host sync; every layer of a
    forward (and its recomputation and backward) passes the same unmodified tensor, so the last one checked is
    remembered: one sync per batch, not one per layer."""
    ref, key, longest = _last_checked
    # Inference tensors keep no version counter: those are checked every time.
    key_now = None if cu_seqlens.is_inference() else (cu_seqlens._version, n_tokens)
    if key_now is not None and ref is not None and ref() is cu_seqlens and key == key_now:
        return longest
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if bounds[0] != 0 or bounds[-1] != n_tokens or min(lengths, default=0) < 0:
        raise ValueError(f"{where}: cu_seqlens must start at 0, never decrease and end at the token count "
                         f"{n_tokens}; got {bounds}")
    longest = max(lengths, default=0)
    if key_now is not None:
        globals()["_last_checked"] = (weakref.ref(cu_seqlens), key_now, longest)
    return longest


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    # Token and head strides are kernel arguments (q/k/v may be views of a fused projection); head_dim is not.
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_config(q: torch.Tensor):
    """(tiles, kernel constants) for a call on q."""
    on_gpu = q.is_cuda and not INTERPRETING  # (triton.knobs is Triton >= 3.4 only)
    dot = _DOT_DTYPE[q.dtype] if on_gpu else tl.float32  # the interpreter's bf16 tl.dot is broken
    precision = "ieee" if dot == tl.float32 else "tf32"  # exact fp32 dots; "tf32" is the no-op default for 16-bit
    head_dim = q.shape[2]
    consts = dict(DOT=dot, PRECISION=precision, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)))
    return _tiles(head_dim, q.dtype, on_gpu), consts


def _forward(q, k, v, cu_seqlens, longest, causal, scale):
    n_tokens, n_heads, _ = q.shape
    tiles, consts = _launch_config(q)
    block_m, block_n = tiles["fwd"]
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((n_heads, n_tokens), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(longest, block_m), n_heads, cu_seqlens.numel() - 1)
    _attn_fwd_kernel[grid](q, k, v, o, lse, cu_seqlens, scale * math.log2(math.e), n_tokens,
                           q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                           o.stride(0), o.stride(1), GROUP=n_heads // k.shape[1], BLOCK_M=block_m,
                           BLOCK_N=block_n, CAUSAL=causal, **consts, **tiles["launch"], **SAME_ROUNDING)
    return o, lse


def _backward(do, q, k, v, o, lse, cu_seqlens, longest, causal, scale):
    n_tokens, n_heads, _ = q.shape
    n_kv_heads = k.shape[1]
    n_seqs = cu_seqlens.numel() - 1
    tiles, consts = _launch_config(q)
    group = n_heads // n_kv_heads
    qk_scale = scale * math.log2(math.e)
    delta = torch.empty_like(lse)
    block_m, _ = tiles["dq"]
    _attn_bwd_delta_kernel[(triton.cdiv(n_tokens, block_m), n_heads)](
        o, do, delta, n_tokens, o.stride(0), o.stride(1), do.stride(0), do.stride(1),
        HEAD_DIM=consts["HEAD_DIM"], BLOCK_D=consts["BLOCK_D"], BLOCK_M=block_m)

    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
              do.stride(0), do.stride(1))
    block_m, block_n = tiles["dkdv"]
    _attn_bwd_dkdv_kernel[(triton.cdiv(longest, block_n), n_kv_heads, n_seqs)](
        q, k, v, do, lse, delta, dk, dv, cu_seqlens, qk_scale, scale, n_tokens, *common,
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), GROUP=group, BLOCK_M=block_m,
        BLOCK_N=block_n, CAUSAL=causal, **consts, **tiles["launch"])
    block_m, block_n = tiles["dq"]
    _attn_bwd_dq_kernel[(triton.cdiv(longest, block_m), n_heads, n_seqs)](
        q, k, v, do, lse, delta, dq, cu_seqlens, qk_scale, scale, n_tokens, *common,
        dq.stride(0), dq.stride(1), GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal,
        **consts, **tiles["launch"])
    return dq, dk, dv


class VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, longest, causal, scale):
        o, lse = _forward(q, k, v, cu_seqlens, longest, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
        ctx.longest, ctx.causal, ctx.scale = longest, causal, scale
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = _backward(_last_dim_contiguous(do), q, k, v, o, lse, cu_seqlens, ctx.longest, ctx.causal,
                               ctx.scale)
        return dq, dk, dv, None, None, None, None


def _selected_backend() -> str:
    choice = os.environ.get("PROTEGE_ATTENTION", "triton").strip().lower() or "triton"
    if choice not in _BACKENDS:
        raise ValueError(f"PROTEGE_ATTENTION={choice!r}: expected one of {', '.join(_BACKENDS)}")
    return choice


def varlen_attention_triton(q, k, v, cu_seqlens, max_seqlen=None, causal=True, softmax_scale=None):
    """Attention of each packed sequence to itself: q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens int32 [B+1]
    -> [T, Hq, D] in q's dtype. softmax_scale defaults to D ** -0.5."""
    longest = _check_inputs(q, k, v, cu_seqlens, max_seqlen)
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[2] ** -0.5
    backend = _selected_backend()
    if backend == "xformers" and q.is_cuda:
        from protege.kernels.ops.xformers_attention import xformers_varlen_attention
        return xformers_varlen_attention(q, k, v, cu_seqlens, causal, scale)
    if backend == "flash_attn" and q.is_cuda:
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError as e:
            raise ImportError("PROTEGE_ATTENTION=flash_attn but the flash_attn package is not importable") from e
        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, longest, longest, softmax_scale=scale,
                                      causal=causal, deterministic=True)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    return VarlenAttention.apply(q, k, v, cu_seqlens, longest, bool(causal), scale)
