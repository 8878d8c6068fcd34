"""Paged KV cache in Triton: write new keys/values into their slots, and attention of new query tokens over
each sequence's cached keys (decode: one token per sequence; prefill: a chunk after a cached prefix).

Cache layout: k_cache / v_cache [num_blocks, block_size, Hkv, D]; slot = block * block_size + offset;
block_tables int32 [B, max_blocks]; the query tokens of sequence b are rows cu_seqlens_q[b]:cu_seqlens_q[b+1]
and sit at the last positions of its context_lens[b] keys.

GQA packing: a program owns one KV head of one sequence, and its query tile holds the (token, query head) pairs
of the GROUP heads sharing that KV head (row r: token r // GROUP, head r % GROUP), so each K/V block is read
once per KV head, and a decode step fills GROUP rows of the tile instead of one.

Two modes (match_training):
- exact: the training kernel's tiles (kernels/ops/attention.py: BLOCK_M, BLOCK_N, warps) and arithmetic (keys
  in BLOCK_N blocks from position 0, base-2 online softmax, scale folding), no split. Each element of a row is
  computed as the trainer computes it, whatever else shares the tile, so a row equals bit for bit what the
  trainer gets for that token when k/v are stored in the activation dtype. Prefill chunks use the training tile
  itself; decode rows the fewest rows that compile to the same tensor-core instruction (exact_decode_block_m:
  16 rows on sm_80 and for fp32, 64 on sm_90, else the training tile), so a decode step does not pay for 128
  rows to fill 7.
- fast: decode rows (sequences with one new token) use a 16-row tile and split-KV: the context of n keys is
  cut into pieces of split_len(n) keys (a function of n only, never of the batch), each piece's partial softmax
  goes to a buffer, and a second kernel merges the pieces of a row with one fixed-shape reduction. Sequences
  with several new tokens use the training tiles, packed, unsplit. A row's bits depend only on its sequence.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from protege.kernels._validate import INTERPRETING
# The trainer's tiles, dot dtype and precision: the same choices give the same numbers.
from protege.kernels.ops.attention import _launch_config as training_launch_config
from protege.kernels.ops.attention import _tiles as training_tiles
from protege.kernels.ops.attention import SAME_ROUNDING


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
def _split_len(ctx, BLOCK_N: tl.constexpr, SPLIT_MIN: tl.constexpr, MAX_SPLITS: tl.constexpr):
    # Keys per split-KV piece of a context of ctx keys: at most MAX_SPLITS pieces, at least SPLIT_MIN keys each,
    # a multiple of BLOCK_N (pieces start on the key blocks of an unsplit walk). Mirrored by split_len below.
    return tl.maximum(tl.cdiv(tl.cdiv(ctx, MAX_SPLITS), BLOCK_N) * BLOCK_N, SPLIT_MIN)


@triton.jit
def _paged_attn_kernel(Q, K_CACHE, V_CACHE, O, O_PART, ML_PART, BLOCK_TABLES, CU_SEQLENS_Q, CONTEXT_LENS,
                       qk_scale, n_q_heads, n_part,
                       stride_qt, stride_qh, stride_ot, stride_oh, stride_cs, stride_ch, stride_bt,
                       PAGE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SELECT: tl.constexpr, SPLIT: tl.constexpr,
                       SPLIT_MIN: tl.constexpr, MAX_SPLITS: tl.constexpr, DOT: tl.constexpr,
                       PRECISION: tl.constexpr):
    # One program: KV head pid(1) of sequence pid(2); pid(0) is the query tile, or with SPLIT the key piece.
    # SELECT: 0 every sequence, 1 only those with one new token, 2 only those with several.
    kv_head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(CU_SEQLENS_Q + seq).to(tl.int64)
    q_len = (tl.load(CU_SEQLENS_Q + seq + 1) - q_start).to(tl.int32)
    if SELECT == 1:
        if q_len != 1:
            return
    if SELECT == 2:
        if q_len < 2:
            return
    ctx = tl.load(CONTEXT_LENS + seq)
    if SPLIT:  # one new token (SELECT == 1): keys [lo, hi) of piece pid(0)
        m0 = 0
        piece = tl.program_id(0)
        length = _split_len(ctx, BLOCK_N, SPLIT_MIN, MAX_SPLITS)
        n_pieces = tl.cdiv(ctx, length)
        lo = piece * length
        if lo >= ctx:
            return
        hi = tl.minimum(lo + length, ctx)
    else:  # keys from 0 up to the tile's last token (later ones are masked for every row)
        m0 = tl.program_id(0) * BLOCK_M
        if m0 >= q_len * GROUP:
            return
        piece = 0
        n_pieces = 1
        lo = 0
        hi = ctx - q_len + tl.minimum((m0 + BLOCK_M - 1) // GROUP, q_len - 1) + 1
    rows = m0 + tl.arange(0, BLOCK_M)
    tok = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    live = tok < q_len
    pos = ctx - q_len + tok  # rows past the last token see every key: no empty row, no NaN
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    q_rows = (q_start + tok.to(tl.int64)) * stride_qt + head * stride_qh
    q = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=live[:, None] & dmask[None, :], other=0.0)
    q = q.to(tl.float32).to(DOT)
    table = BLOCK_TABLES + seq.to(tl.int64) * stride_bt

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):  # the training kernel's update, in its order
        cols = n0 + tl.arange(0, BLOCK_N)
        valid = cols < hi
        block = tl.load(table + cols // PAGE, mask=valid, other=0).to(tl.int64)
        slot = block * PAGE + cols % PAGE
        kv_off = slot[:, None] * stride_cs + kv_head * stride_ch + offs_d[None, :]
        kv_mask = valid[:, None] & dmask[None, :]
        k = tl.load(K_CACHE + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(V_CACHE + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k.to(DOT)), input_precision=PRECISION) * qk_scale
        s = tl.where(valid[None, :] & (pos[:, None] >= cols[None, :]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v.to(DOT), input_precision=PRECISION)
        m_i = m_new
    out_mask = live[:, None] & dmask[None, :]
    if n_pieces == 1:
        o_rows = (q_start + tok.to(tl.int64)) * stride_ot + head * stride_oh
        tl.store(O + o_rows[:, None] + offs_d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty), mask=out_mask)
    else:  # this piece's unnormalised output and (max, sum) for the merge
        part = (seq.to(tl.int64) * n_q_heads + head) * n_part + piece
        tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=out_mask)
        tl.store(ML_PART + part * 2, m_i, mask=live)
        tl.store(ML_PART + part * 2 + 1, l_i, mask=live)


@triton.jit
def _merge_pieces_kernel(O, O_PART, ML_PART, CU_SEQLENS_Q, CONTEXT_LENS, n_q_heads, n_part, stride_ot, stride_oh,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                         SPLIT_MIN: tl.constexpr, MAX_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr):
    # One program: query head pid(0) of a split decode row of sequence pid(1). All pieces are merged by one
    # reduction of a fixed [BLOCK_S, BLOCK_D] shape (absent pieces weigh 0): the same order for every row.
    head = tl.program_id(0)
    seq = tl.program_id(1)
    q_start = tl.load(CU_SEQLENS_Q + seq).to(tl.int64)
    if tl.load(CU_SEQLENS_Q + seq + 1) - q_start != 1:
        return
    ctx = tl.load(CONTEXT_LENS + seq)
    n_pieces = tl.cdiv(ctx, _split_len(ctx, BLOCK_N, SPLIT_MIN, MAX_SPLITS))
    if n_pieces == 1:  # written by the attention kernel itself
        return
    pieces = tl.arange(0, BLOCK_S)
    present = pieces < n_pieces
    part = (seq.to(tl.int64) * n_q_heads + head) * n_part + pieces
    m = tl.load(ML_PART + part * 2, mask=present, other=float("-inf"))
    l = tl.load(ML_PART + part * 2 + 1, mask=present, other=0.0)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.load(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :],
                  mask=present[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    w = tl.exp2(m - tl.max(m, 0))  # piece 0 holds key 0: the max is finite
    o = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(O + q_start * stride_ot + head * stride_oh + offs_d, o.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)


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


# Split-KV of fast-mode decode rows, (SPLIT_MIN, MAX_SPLITS) on a GPU / in the interpreter (whose BLOCK_N is 16,
# so that small tests cross pieces). GPU: contexts up to 512 keys are not split, 8K keys and more use 16 pieces.
SPLITS = {True: (512, 16), False: (32, 4)}


def split_len(ctx: int, block_n: int, split_min: int, max_splits: int) -> int:
    """Keys per split-KV piece of a ctx-key context (the kernels' _split_len)."""
    return max(triton.cdiv(triton.cdiv(ctx, max_splits), block_n) * block_n, split_min)


def exact_decode_block_m(capability, dtype, group: int, train_block_m: int) -> tuple[int, int | None]:
    """(rows, warps) of exact mode's decode tile on a device of compute capability (major, minor) (None: the
    interpreter): the fewest rows that hold a KV head's `group` query heads and still compile to the training
    tile's tensor-core instruction. Each element is then the training kernel's sum in its order (a row's bits
    do not depend on the rows sharing its tile, as for linear.block_m_choices). fp32 and the interpreter:
    fused multiply-adds, any tile; sm_8x: mma.sync at every size; sm_9x: wgmma needs 64 rows per warpgroup
    (64 rows, 4 warps); other devices: unchecked, the training tile. benchmarks/gpu_compile.py checks the
    instruction for sm_90 and sm_80, benchmarks/gpu_exact_check.py the bits on a device."""
    rows = max(16, triton.next_power_of_2(group))
    if capability is None or dtype == torch.float32 or capability[0] == 8:
        return min(rows, train_block_m), None
    if capability[0] == 9:
        return min(max(64, rows), train_block_m), 4
    return train_block_m, None


def decode_plan(on_gpu: bool, dtype: torch.dtype, head_dim: int, group: int, match_training: bool,
                capability=None) -> dict:
    """Tiles of a step: for sequences with one new token ("decode") and with several ("prefill"), each
    dict(block_m, block_n, launch, split) with split = (SPLIT_MIN, MAX_SPLITS) or None. capability: the GPU's
    (major, minor) (exact mode's decode tile depends on it; None on a GPU: the training tile)."""
    tiles = training_tiles(head_dim, dtype, on_gpu)
    block_m, block_n = tiles["fwd"]
    train = dict(block_m=block_m, block_n=block_n, launch=tiles["launch"], split=None)
    if match_training:
        if on_gpu and capability is None:
            return dict(decode=train, prefill=train)
        rows, warps = exact_decode_block_m(capability if on_gpu else None, dtype, group, block_m)
        launch = dict(tiles["launch"], num_warps=warps) if warps else tiles["launch"]
        return dict(decode=dict(train, block_m=rows, launch=launch), prefill=train)
    launch = dict(tiles["launch"], num_warps=4) if tiles["launch"] else {}
    decode = dict(block_m=max(16, triton.next_power_of_2(group)), block_n=block_n, launch=launch,
                  split=SPLITS[on_gpu])
    return dict(decode=decode, prefill=train)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def paged_attention_triton(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, max_query_len,
                           softmax_scale=None, match_training=True):
    """q [T, Hq, D] (the new tokens, packed by sequence) over the paged cache -> o [T, Hq, D].
    match_training=True: rows bit-identical to the training attention's (its tiles, no split).
    match_training=False: decode rows with 16-row GQA tiles and split-KV (see the module docstring)."""
    _check_cache(k_cache, v_cache)
    n_tokens, n_heads, head_dim = q.shape
    n_kv_heads, page = k_cache.shape[2], k_cache.shape[1]
    o = torch.empty_like(q)
    n_seqs = context_lens.numel()
    if n_tokens == 0 or n_seqs == 0:
        return o
    if q.stride(-1) != 1:
        q = q.contiguous()
    _, consts = training_launch_config(q)
    group = n_heads // n_kv_heads
    on_gpu = q.is_cuda and not INTERPRETING
    plan = decode_plan(on_gpu, q.dtype, head_dim, group, match_training,
                       _capability(q.device.index or 0) if on_gpu else None)
    scale = float(softmax_scale) if softmax_scale is not None else head_dim ** -0.5

    def launch(tiles, select, grid0, o_part=o, ml_part=o, n_part=1):
        split_min, max_splits = tiles["split"] or (0, 1)
        _paged_attn_kernel[(grid0, n_kv_heads, n_seqs)](
            q, k_cache, v_cache, o, o_part, ml_part, block_tables, cu_seqlens_q, context_lens,
            scale * math.log2(math.e), n_heads, n_part, q.stride(0), q.stride(1), o.stride(0), o.stride(1),
            k_cache.stride(1), k_cache.stride(2), block_tables.stride(0), PAGE=page, GROUP=group,
            BLOCK_M=tiles["block_m"], BLOCK_N=tiles["block_n"], SELECT=select, SPLIT=tiles["split"] is not None,
            SPLIT_MIN=split_min, MAX_SPLITS=max_splits, **consts, **tiles["launch"], **SAME_ROUNDING)

    def tiles_for(tiles, query_len):  # query tiles of the longest sequence
        return triton.cdiv(query_len * group, tiles["block_m"])

    if match_training:  # the trainer's tiles, or for decode rows fewer rows of the same arithmetic
        if plan["decode"] == plan["prefill"]:
            launch(plan["prefill"], 0, tiles_for(plan["prefill"], max_query_len))
            return o
        launch(plan["decode"], 1, tiles_for(plan["decode"], 1))
        if max_query_len > 1:
            launch(plan["prefill"], 2, tiles_for(plan["prefill"], max_query_len))
        return o
    decode = plan["decode"]
    split_min, max_splits = decode["split"]
    # Pieces of the longest possible context (the block table's width): the buffers' and grid's size only.
    n_part = min(max_splits, triton.cdiv(block_tables.shape[1] * page, split_min))
    o_part = ml_part = o
    if n_part > 1:
        o_part = torch.empty((n_seqs, n_heads, n_part, head_dim), dtype=torch.float32, device=q.device)
        ml_part = torch.empty((n_seqs, n_heads, n_part, 2), dtype=torch.float32, device=q.device)
    launch(decode, 1, n_part, o_part, ml_part, n_part)
    if n_part > 1:
        _merge_pieces_kernel[(n_heads, n_seqs)](
            o, o_part, ml_part, cu_seqlens_q, context_lens, n_heads, n_part, o.stride(0), o.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=consts["BLOCK_D"], BLOCK_N=decode["block_n"], SPLIT_MIN=split_min,
            MAX_SPLITS=max_splits, BLOCK_S=max(2, triton.next_power_of_2(max_splits)))
    if max_query_len > 1:
        launch(plan["prefill"], 2, tiles_for(plan["prefill"], max_query_len))
    return o
