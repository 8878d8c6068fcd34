"""Fused lm_head + log-softmax: log p(target) (and optionally the entropy) of every token under
softmax(hidden @ weight.T / temperature), without ever holding the [T, V] logits.

The logits are computed tile by tile inside the kernels (tl.dot, fp32 accumulation) with an online
logsumexp over fixed vocabulary splits; the backward recomputes the logits of one chunk of rows at a time,
turns them into d logits, and multiplies (dH = dlogits @ W, dW += dlogits^T @ H). The PyTorch path with the
same contract is kernels.reference.token_logprobs_chunked.

Both are batch-invariant: a row's result never depends on T or on the other rows, because every tile, split
and block has a fixed shape (the sampler calls this function on the last hidden states and must get exactly
the log-probs the trainer computes). Gradients are deterministic but need not be batch-invariant.

Gradients (z = logits / temperature, p = softmax(z), lse = logsumexp(z), E = sum p z, entropy = lse - E):
  d logp / dz = onehot(target) - p,     d entropy / dz = p * (E - z),     d z / d logits = 1 / temperature.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from protege.kernels._validate import check_float_tensor, check_token_logprobs_inputs

# Triton tiles. V_SPLIT columns of the vocabulary per program in the forward: fixed (never derived from T)
# so that a row's online-softmax order is the same in every call; small enough to fill the GPU at decode.
BLOCK_T, BLOCK_V, BLOCK_H = 64, 128, 64
V_SPLIT = 1024
COMBINE_BLOCK = 128
MATMUL_BLOCK = 64
# No multiply-add contraction in the split kernels: z = logits * (1 / temperature) is then rounded once before
# the softmax uses it, in the fused op as in the one over head_logits' stored z, so both give the same bits.
SAME_ROUNDING = {"enable_fp_fusion": False}
# Rows per backward chunk: the [chunk, V] d-logits buffer is the op's largest temporary.
TRITON_CHUNK_ROWS = 2048

# ----------------------------------------------------------------------------------------------- Triton

@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w,
                 BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 FP32_DOT: tl.constexpr):
    """hidden[rows] @ weight[cols].T as a [BLOCK_T, BLOCK_V] fp32 tile (fixed K order over H)."""
    acc = tl.zeros((BLOCK_T, BLOCK_V), tl.float32)
    row_offs = rows.to(tl.int64) * stride_h  # int64: T x H and V x H can pass 2^31
    col_offs = cols.to(tl.int64) * stride_w
    for h0 in range(0, H, BLOCK_H):
        ks = h0 + tl.arange(0, BLOCK_H)
        k_mask = ks < H
        x = tl.load(h_ptr + row_offs[:, None] + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + col_offs[None, :] + ks[:, None],
                    mask=col_mask[None, :] & k_mask[:, None], other=0.0)
        if FP32_DOT:  # fp32 inputs, or the CPU interpreter (whose bf16 arithmetic is broken)
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    return acc


@triton.jit
def _forward_split_kernel(h_ptr, w_ptr, tgt_ptr, part_ptr, T, V, H, stride_h, stride_w, inv_temp,
                          V_SPLIT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
                          BLOCK_H: tl.constexpr, FP32_DOT: tl.constexpr):
    """Online softmax statistics of BLOCK_T rows over one V_SPLIT slice of the vocabulary:
    running max m, s = sum exp(z - m), e = sum exp(z - m) * z, and the target's z if it lies here."""
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1)
    m = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_T,), tl.float32)
    e = tl.zeros((BLOCK_T,), tl.float32)
    z_tgt = tl.zeros((BLOCK_T,), tl.float32)
    for v0 in range(pid_s * V_SPLIT, pid_s * V_SPLIT + V_SPLIT, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z = _logits_tile(h_ptr, w_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w,
                         BLOCK_T, BLOCK_V, BLOCK_H, FP32_DOT) * inv_temp
        m, s, e, z_tgt = _online_softmax_step(z, cols, col_mask, tgt, m, s, e, z_tgt)
    _store_split(part_ptr, pid_s, rows, row_mask, T, m, s, e, z_tgt)


@triton.jit
def _online_softmax_step(z, cols, col_mask, tgt, m, s, e, z_tgt):
    """Fold one [rows, BLOCK_V] tile of z into the running statistics (shared by both split kernels, so the
    fused op and the one over stored logits do the same arithmetic)."""
    z_valid = tl.where(col_mask[None, :], z, float("-inf"))  # masked columns' z is 0: p * z = 0 there
    m_new = tl.maximum(m, tl.max(z_valid, 1))
    alpha = tl.exp(m - m_new)
    p = tl.exp(z_valid - m_new[:, None])
    s = s * alpha + tl.sum(p, 1)
    e = e * alpha + tl.sum(p * z, 1)
    z_tgt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), 1)
    return m_new, s, e, z_tgt


@triton.jit
def _store_split(part_ptr, pid_s, rows, row_mask, T, m, s, e, z_tgt):
    base = part_ptr + pid_s * 4 * T + rows
    tl.store(base, m, mask=row_mask)
    tl.store(base + T, s, mask=row_mask)
    tl.store(base + 2 * T, e, mask=row_mask)
    tl.store(base + 3 * T, z_tgt, mask=row_mask)


@triton.jit
def _stored_split_kernel(z_ptr, tgt_ptr, part_ptr, T, V, stride_z, V_SPLIT: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr):
    """_forward_split_kernel's statistics over logits already in memory (head_logits' z): same splits, same
    tiles, same order, so the same bits without reading the LM head again."""
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1)
    m = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_T,), tl.float32)
    e = tl.zeros((BLOCK_T,), tl.float32)
    z_tgt = tl.zeros((BLOCK_T,), tl.float32)
    for v0 in range(pid_s * V_SPLIT, pid_s * V_SPLIT + V_SPLIT, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z = tl.load(z_ptr + rows[:, None].to(tl.int64) * stride_z + cols[None, :],
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        m, s, e, z_tgt = _online_softmax_step(z, cols, col_mask, tgt, m, s, e, z_tgt)
    _store_split(part_ptr, pid_s, rows, row_mask, T, m, s, e, z_tgt)


@triton.jit
def _head_logits_kernel(h_ptr, w_ptr, z_ptr, T, V, H, stride_h, stride_w, stride_z, inv_temp,
                        BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                        FP32_DOT: tl.constexpr):
    """z = logits / temperature of one [BLOCK_T, BLOCK_V] tile, the very numbers the forward's softmax uses."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < T
    col_mask = cols < V
    z = _logits_tile(h_ptr, w_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w,
                     BLOCK_T, BLOCK_V, BLOCK_H, FP32_DOT) * inv_temp
    tl.store(z_ptr + rows[:, None].to(tl.int64) * stride_z + cols[None, :], z,
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _forward_combine_kernel(part_ptr, logp_ptr, lse_ptr, entropy_ptr, mean_ptr, T, NUM_SPLITS,
                            BLOCK: tl.constexpr):
    """Merge the splits' statistics in split order (fixed, so deterministic and batch-invariant)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < T
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK,), tl.float32)
    e = tl.zeros((BLOCK,), tl.float32)
    z_tgt = tl.zeros((BLOCK,), tl.float32)
    for i in range(0, NUM_SPLITS):
        base = part_ptr + i * 4 * T + rows
        m_i = tl.load(base, mask=mask, other=0.0)
        m_new = tl.maximum(m, m_i)
        alpha = tl.exp(m - m_new)
        beta = tl.exp(m_i - m_new)
        s = s * alpha + tl.load(base + T, mask=mask, other=1.0) * beta
        e = e * alpha + tl.load(base + 2 * T, mask=mask, other=0.0) * beta
        z_tgt += tl.load(base + 3 * T, mask=mask, other=0.0)
        m = m_new
    lse = m + tl.log(s)
    mean_z = e / s
    tl.store(logp_ptr + rows, z_tgt - lse, mask=mask)
    tl.store(lse_ptr + rows, lse, mask=mask)
    tl.store(entropy_ptr + rows, lse - mean_z, mask=mask)
    tl.store(mean_ptr + rows, mean_z, mask=mask)


@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, tgt_ptr, lse_ptr, mean_ptr, g_ptr, ge_ptr, d_ptr, T, V, H,
                    stride_h, stride_w, stride_d, inv_temp, ENTROPY_GRAD: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                    FP32_DOT: tl.constexpr):
    """d loss / d logits of one [BLOCK_T, BLOCK_V] tile, recomputing the tile's logits."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < T
    col_mask = cols < V
    z = _logits_tile(h_ptr, w_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w,
                     BLOCK_T, BLOCK_V, BLOCK_H, FP32_DOT) * inv_temp
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    p = tl.exp(z - lse[:, None])
    dz = tl.where(cols[None, :] == tgt[:, None], g[:, None], 0.0) - g[:, None] * p
    if ENTROPY_GRAD:
        ge = tl.load(ge_ptr + rows, mask=row_mask, other=0.0)
        mean_z = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
        dz += ge[:, None] * p * (mean_z[:, None] - z)
    d = dz * inv_temp
    tl.store(d_ptr + rows.to(tl.int64)[:, None] * stride_d + cols[None, :], d.to(d_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm,
                   ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr, FP32_DOT: tl.constexpr):
    """c[M, N] (+)= a[M, K] @ b[K, N] with fp32 accumulation; each program owns one output tile, so the
    result is deterministic (no atomics)."""
    rm = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)  # int64 offsets: V x H can pass 2^31
    rn = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    m_mask = rm < M
    n_mask = rn < N
    acc = tl.zeros((BLOCK, BLOCK), tl.float32)
    for k0 in range(0, K, BLOCK):
        rk = (k0 + tl.arange(0, BLOCK)).to(tl.int64)
        k_mask = rk < K
        a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if FP32_DOT:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


def _matmul(a, b, c, accumulate):
    """c (+)= a @ b for 2-D tensors with unit stride along c's rows."""
    (M, K), N = a.shape, b.shape[1]
    grid = (triton.cdiv(M, MATMUL_BLOCK), triton.cdiv(N, MATMUL_BLOCK))
    _matmul_kernel[grid](a, b, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0),
                         ACCUMULATE=accumulate, BLOCK=MATMUL_BLOCK, FP32_DOT=_fp32_dot(a))


def _fp32_dot(t):
    # On the CPU interpreter everything goes through fp32 (bf16 arithmetic is broken there); on a GPU only
    # fp32 inputs do (with IEEE precision, not TF32), half types use the tensor cores with fp32 accumulation.
    return t.dtype == torch.float32 or not t.is_cuda


class _TritonTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, return_entropy):
        hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
        (T, H), V = hidden.shape, weight.shape[0]
        outs = torch.empty(4, T, dtype=torch.float32, device=hidden.device)
        logp, lse, entropy, mean_z = outs.unbind(0)
        if T:
            num_splits = triton.cdiv(V, V_SPLIT)
            partial = torch.empty(num_splits, 4, T, dtype=torch.float32, device=hidden.device)
            _forward_split_kernel[(triton.cdiv(T, BLOCK_T), num_splits)](
                hidden, weight, targets, partial, T, V, H, hidden.stride(0), weight.stride(0),
                1.0 / temperature, V_SPLIT=V_SPLIT, BLOCK_T=BLOCK_T, BLOCK_V=BLOCK_V, BLOCK_H=BLOCK_H,
                FP32_DOT=_fp32_dot(hidden), **SAME_ROUNDING)
            _forward_combine_kernel[(triton.cdiv(T, COMBINE_BLOCK),)](
                partial, logp, lse, entropy, mean_z, T, num_splits, BLOCK=COMBINE_BLOCK)
        ctx.save_for_backward(hidden, weight, targets, lse, mean_z)
        ctx.temperature, ctx.return_entropy = temperature, return_entropy
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse, mean_z = ctx.saved_tensors
        (T, H), V = hidden.shape, weight.shape[0]
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_logp = grad_logp.float().contiguous()
        grad_entropy = grad_entropy.float().contiguous() if ctx.return_entropy else grad_logp
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = (torch.empty if T else torch.zeros)(V, H, dtype=torch.float32, device=hidden.device) \
            if need_weight else None
        chunk = max(1, min(T, TRITON_CHUNK_ROWS))
        dlogits = torch.empty(chunk, V, dtype=hidden.dtype, device=hidden.device)
        for c0 in range(0, T, chunk):
            c1 = min(T, c0 + chunk)
            rows, d = c1 - c0, dlogits[: c1 - c0]
            _dlogits_kernel[(triton.cdiv(rows, BLOCK_T), triton.cdiv(V, BLOCK_V))](
                hidden[c0:c1], weight, targets[c0:c1], lse[c0:c1], mean_z[c0:c1], grad_logp[c0:c1],
                grad_entropy[c0:c1], d, rows, V, H, hidden.stride(0), weight.stride(0), d.stride(0),
                1.0 / ctx.temperature, ENTROPY_GRAD=ctx.return_entropy, BLOCK_T=BLOCK_T, BLOCK_V=BLOCK_V,
                BLOCK_H=BLOCK_H, FP32_DOT=_fp32_dot(hidden))
            if need_hidden:
                _matmul(d, weight, grad_hidden[c0:c1], accumulate=False)
            if need_weight:
                _matmul(d.t(), hidden[c0:c1], grad_weight, accumulate=c0 > 0)
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def token_logprobs_triton(hidden, weight, targets, temperature=1.0, return_entropy=False, check_ids=True):
    """log p(targets) [T] fp32 (and the entropy [T] if return_entropy) via the fused Triton kernels."""
    check_token_logprobs_inputs(hidden, weight, targets, temperature, check_ids)
    check_float_tensor("token_logprobs", "hidden", hidden)  # a CUDA tensor, or the interpreter
    logp, entropy = _TritonTokenLogprobs.apply(hidden, weight, targets, float(temperature), return_entropy)
    return (logp, entropy) if return_entropy else logp


def head_logits_triton(hidden, weight, temperature=1.0):
    """[T, V] fp32 logits / temperature, computed tile for tile as token_logprobs_triton computes them, so a
    token drawn from softmax of these has exactly the distribution whose log-prob that op reports."""
    check_token_logprobs_inputs(hidden, weight, torch.zeros(hidden.shape[0], dtype=torch.int64,
                                                            device=hidden.device), temperature)
    check_float_tensor("head_logits", "hidden", hidden)
    hidden, weight = hidden.contiguous(), weight.contiguous()
    (T, H), V = hidden.shape, weight.shape[0]
    z = torch.empty(T, V, dtype=torch.float32, device=hidden.device)
    if T:
        _head_logits_kernel[(triton.cdiv(T, BLOCK_T), triton.cdiv(V, BLOCK_V))](
            hidden, weight, z, T, V, H, hidden.stride(0), weight.stride(0), z.stride(0), 1.0 / temperature,
            BLOCK_T=BLOCK_T, BLOCK_V=BLOCK_V, BLOCK_H=BLOCK_H, FP32_DOT=_fp32_dot(hidden), **SAME_ROUNDING)
    return z


def logprobs_from_logits_triton(z, targets):
    """log p(targets) [T] fp32 from head_logits_triton's z [T, V]: bit for bit token_logprobs_triton of the
    same rows (the same splits, tiles and order), without a second pass over the LM head."""
    (T, V), z = z.shape, z.contiguous()
    targets = targets.contiguous()
    outs = torch.empty(4, T, dtype=torch.float32, device=z.device)
    if T:
        num_splits = triton.cdiv(V, V_SPLIT)
        partial = torch.empty(num_splits, 4, T, dtype=torch.float32, device=z.device)
        _stored_split_kernel[(triton.cdiv(T, BLOCK_T), num_splits)](
            z, targets, partial, T, V, z.stride(0), V_SPLIT=V_SPLIT, BLOCK_T=BLOCK_T, BLOCK_V=BLOCK_V,
            **SAME_ROUNDING)
        _forward_combine_kernel[(triton.cdiv(T, COMBINE_BLOCK),)](
            partial, *outs.unbind(0), T, num_splits, BLOCK=COMBINE_BLOCK)
    return outs[0]
