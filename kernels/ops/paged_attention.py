"""Paged KV cache in Triton: write new keys/values into their slots, and attention of new query tokens over
each sequence's cached keys (decode: one token per sequence; prefill: a chunk after a cached prefix).

Cache layout: k_cache / v_cache [num_blocks, block_size, Hkv, D]; slot = block * block_size + offset;
block_tables int32 [B, max_blocks]; the query tokens of sequence b are rows cu_seqlens_q[b]:cu_seqlens_q[b+1]
and sit at the last positions of its context_lens[b] keys.

Batch invariance, and agreement with training: a program owns one query tile of one sequence and one head and
walks that sequence's keys from position 0 in tiles of a fixed size, with the arithmetic (base-2 online
softmax, scale folding, tile sizes) of the training kernel kernels/ops/attention.py. A row's result thus depends
on neither the batch nor the chunking, and equals bit for bit what the trainer computes for that token when
k/v are stored in the activation dtype (the interpreter; on a GPU, as far as tl.dot is shape-stable).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# The trainer's tiles, dot dtype and precision: the same choices give the same numbers.
from kernels.ops.attention import _launch_config as training_launch_config


@triton.jit
def _write_kv_kernel(K, V, K_CACHE, V_CACHE, SLOTS, stride_kt, stride_vt, stride_cs,
                     ROW: tl.constexpr, BLOCK: tl.constexpr):
    # One program per token: its [Hkv * D] row goes to its slot (slot < 0: already cached, skip).
    t = tl.program_id(0)
    slot = tl.load(SLOTS + t).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = (offs < ROW) & (slot >= 0)
    k = tl.load(K + t.to(tl.int64) * stride_kt + offs, mask=mask)
    v = tl.load(V + t.to(tl.int64) * stride_vt + offs, mask=mask)
    tl.store(K_CACHE + slot * stride_cs + offs, k, mask=mask)
    tl.store(V_CACHE + slot * stride_cs + offs, v, mask=mask)


@triton.jit
def _paged_attn_kernel(Q, K_CACHE, V_CACHE, O, BLOCK_TABLES, CU_SEQLENS_Q, CONTEXT_LENS, qk_scale,
                       stride_qt, stride_qh, stride_ot, stride_oh, stride_cs, stride_ch, stride_bt,
                       PAGE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr,
                       PRECISION: tl.constexpr):
    # One program: query tile pid(0) of sequence pid(2), query head pid(1).
    m0 = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(CU_SEQLENS_Q + seq).to(tl.int64)
    q_len = (tl.load(CU_SEQLENS_Q + seq + 1) - q_start).to(tl.int32)
    if m0 >= q_len:
        return
    ctx = tl.load(CONTEXT_LENS + seq)
    first_pos = ctx - q_len  # position of the sequence's first query token
    kv_head = head // GROUP
    rows = m0 + tl.arange(0, BLOCK_M)
    pos = first_pos + rows
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    q_ptrs = Q + (q_start + rows.to(tl.int64))[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(rows < q_len)[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    table = BLOCK_TABLES + seq.to(tl.int64) * stride_bt

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    end = tl.minimum(first_pos + m0 + BLOCK_M, ctx)  # keys past the tile's last row are never seen
    for n0 in range(0, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        valid = cols < ctx
        block = tl.load(table + cols // PAGE, mask=valid, other=0).to(tl.int64)
        slot = block * PAGE + cols % PAGE
        kv_off = slot[:, None] * stride_cs + kv_head * stride_ch + offs_d[None, :]
        kv_mask = valid[:, None] & dmask[None, :]
        k = tl.load(K_CACHE + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(V_CACHE + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.dot(q.to(DOT), tl.trans(k.to(DOT)), input_precision=PRECISION) * qk_scale
        s = tl.where(valid[None, :] & (pos[:, None] >= cols[None, :]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v.to(DOT), input_precision=PRECISION)
        m_i = m_new
    o_ptrs = O + (q_start + rows.to(tl.int64))[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, (acc / l_i[:, None]).to(O.dtype.element_ty), mask=(rows < q_len)[:, None] & dmask[None, :])


def _check_cache(k_cache, v_cache):
    # Slots are addressed as block * block_size + offset with one stride: the pool must be contiguous.
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 4 or not c.is_contiguous():
            raise ValueError(f"{name} must be a contiguous [num_blocks, block_size, Hkv, D] tensor, got shape "
                             f"{tuple(c.shape)} strides {c.stride()}")


def write_kv_cache_triton(k, v, k_cache, v_cache, slot_mapping):
    """k/v [T, Hkv, D] into k_cache/v_cache [num_blocks, block_size, Hkv, D] at slot_mapping [T] (-1: skip)."""
    _check_cache(k_cache, v_cache)
    n_tokens = k.shape[0]
    if n_tokens == 0:
        return
    row = k.shape[1] * k.shape[2]
    # One row per token, elements at unit stride (the kernel's addressing); reshape copies when it must.
    k, v = (t.reshape(n_tokens, row) for t in (k, v))
    k, v = (t if t.stride(1) == 1 else t.contiguous() for t in (k, v))
    _write_kv_kernel[(n_tokens,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0),
                                  k_cache.stride(1), ROW=row, BLOCK=triton.next_power_of_2(row))


def paged_attention_triton(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, max_query_len,
                           softmax_scale=None, match_training=True):
    """q [T, Hq, D] (the new tokens, packed by sequence) over the paged cache -> o [T, Hq, D].
    match_training=False lets a decode step (one query per sequence) use 16-row query tiles instead of the
    trainer's (128 on a GPU): 8x less wasted tensor-core work, results no longer tied to the trainer's bits
    (pointless to keep when the projections are not batch-invariant anyway)."""
    _check_cache(k_cache, v_cache)
    n_tokens, n_heads, head_dim = q.shape
    o = torch.empty_like(q)
    n_seqs = context_lens.numel()
    if n_tokens == 0 or n_seqs == 0:
        return o
    if q.stride(-1) != 1:
        q = q.contiguous()
    tiles, consts = training_launch_config(q)
    block_m, block_n = tiles["fwd"]
    launch = tiles["launch"]
    if not match_training and max_query_len == 1:
        block_m, launch = 16, dict(launch, num_warps=4) if launch else launch
    scale = float(softmax_scale) if softmax_scale is not None else head_dim ** -0.5
    grid = (triton.cdiv(max_query_len, block_m), n_heads, n_seqs)
    _paged_attn_kernel[grid](
        q, k_cache, v_cache, o, block_tables, cu_seqlens_q, context_lens, scale * math.log2(math.e),
        q.stride(0), q.stride(1), o.stride(0), o.stride(1), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), PAGE=k_cache.shape[1], GROUP=n_heads // k_cache.shape[2], BLOCK_M=block_m,
        BLOCK_N=block_n, **consts, **launch)
    return o
