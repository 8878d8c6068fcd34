"""Plain PyTorch implementations of every op: the CPU path and the oracle the Triton kernels are tested
against. They follow Hugging Face's Qwen2 numerics (where it rounds, these round the same way), except RoPE:
HF rounds cos/sin to the activation dtype and rotates in it; here the rotation is in fp32, cast once."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from protege.kernels._validate import check_token_logprobs_inputs


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As HF: statistics in fp32, normalised value cast back to the input dtype, then scaled by the weight.
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    s = x + residual
    return rms_norm(s, weight, eps), s


def rope_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    # Exactly HF's formula, so the angles (and hence cos/sin) are the same fp32 numbers.
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta ** exponent)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    """cos, sin of shape [T, head_dim // 2] in fp32."""
    angles = positions.float()[:, None] * rope_inv_freq(head_dim, theta, positions.device)[None, :]
    return angles.cos(), angles.sin()


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float):
    """NeoX-style rotary embedding of q [T, Hq, D] and k [T, Hkv, D] at per-token positions [T].
    Rotation in fp32, result cast to the input dtype."""
    cos, sin = rope_cos_sin(positions, q.shape[-1], theta)
    cos, sin = cos[:, None, :], sin[:, None, :]

    def rotate(x):
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   temperature: float = 1.0, return_entropy: bool = False):
    """log p(targets[t]) under softmax(hidden[t] @ weight.T / temperature), in fp32 (fp64 for fp64 inputs),
    materialising the full [T, V] logits (the oracle; the fused op never does). Optionally the entropy."""
    logits = (hidden @ weight.t()).to(torch.promote_types(hidden.dtype, torch.float32)) / temperature
    logp = torch.log_softmax(logits, dim=-1)
    out = logp.gather(-1, targets.long()[:, None]).squeeze(-1)
    if not return_entropy:
        return out
    return out, -(logp.exp() * logp).sum(-1)


# PyTorch path: logits are computed ROW_BLOCK rows at a time, zero-padded to exactly ROW_BLOCK rows, because
# the BLAS picks its kernel (and its summation order) from the matrix shape (MKL sums a lone row differently).
# 64 rows cost about what 16 do on the CPU (small-M GEMMs are slow). The backward handles CHUNK_ROWS rows at a
# time: its [CHUNK_ROWS, V] logits and d-logits buffers are the op's largest temporaries.
ROW_BLOCK = 64
CHUNK_ROWS = 256


def _logit_blocks(hidden, weight, temperature):
    """For the rows in blocks of ROW_BLOCK: (first row, rows, z) where z is the block's fp32
    logits / temperature, always computed as exactly ROW_BLOCK (zero-padded) rows. As the reference, the matmul
    runs in the input dtype. The buffers are reused from block to block (fresh large CPU allocations cost page
    faults), so z is only valid until the next block."""
    V, H = weight.shape
    z = torch.empty(ROW_BLOCK, V, dtype=torch.float32, device=hidden.device)
    logits = z if hidden.dtype == torch.float32 else torch.empty(ROW_BLOCK, V, dtype=hidden.dtype,
                                                                  device=hidden.device)
    rows_in = torch.zeros(ROW_BLOCK, H, dtype=hidden.dtype, device=hidden.device)
    for first in range(0, hidden.shape[0], ROW_BLOCK):
        n = min(hidden.shape[0], first + ROW_BLOCK) - first
        rows_in[:n] = hidden[first:first + n]
        rows_in[n:] = 0
        torch.mm(rows_in, weight.t(), out=logits)
        if logits is not z:
            z.copy_(logits)
        yield first, n, z.div_(temperature)


def _block_logprobs(z, targets, p):
    """(lse, mean z, log p(targets)) of the ROW_BLOCK rows of z, whose targets are `targets`. Reductions over
    the whole padded block: their parallel split depends on the shape only."""
    m = z.amax(-1, keepdim=True)
    s = torch.sub(z, m, out=p).exp_().sum(-1)
    lse = m.squeeze(1) + s.log()
    e = p.mul_(z).sum(-1)
    n = targets.shape[0]
    return lse[:n], (e / s)[:n], z[:n].gather(1, targets[:, None]).squeeze(1) - lse[:n]


def logprobs_from_logits_chunked(z, targets):
    """log p(targets) [T] fp32 from head_logits_chunked's z [T, V]: bit for bit token_logprobs_chunked of the
    same rows (the same padded blocks and reductions), without a second pass over the LM head."""
    T, V = z.shape
    out = torch.empty(T, dtype=torch.float32, device=z.device)
    block = torch.zeros(ROW_BLOCK, V, dtype=torch.float32, device=z.device)
    p = torch.empty(ROW_BLOCK, V, dtype=torch.float32, device=z.device)
    for first in range(0, T, ROW_BLOCK):
        n = min(T, first + ROW_BLOCK) - first
        block[:n] = z[first:first + n]
        block[n:] = 0
        out[first:first + n] = _block_logprobs(block, targets[first:first + n].long(), p)[2]
    return out


class _ChunkedTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, return_entropy):
        T, V = hidden.shape[0], weight.shape[0]
        outs = torch.empty(4, T, dtype=torch.float32, device=hidden.device)
        logp, lse, entropy, mean_z = outs.unbind(0)
        targets = targets.long()
        p = torch.empty(ROW_BLOCK, V, dtype=torch.float32, device=hidden.device)
        for first, n, z in _logit_blocks(hidden, weight, temperature):
            rows = slice(first, first + n)
            lse[rows], mean_z[rows], logp[rows] = _block_logprobs(z, targets[rows], p)
        torch.sub(lse, mean_z, out=entropy)
        ctx.save_for_backward(hidden, weight, targets, lse, mean_z)
        ctx.temperature, ctx.return_entropy = temperature, return_entropy
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse, mean_z = ctx.saved_tensors
        (T, H), V = hidden.shape, weight.shape[0]
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_logp, grad_entropy = grad_logp.float()[:, None], grad_entropy.float()[:, None]
        lse, mean_z, targets = lse[:, None], mean_z[:, None], targets[:, None]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(V, H, dtype=torch.float32, device=hidden.device) if need_weight else None
        # Gradients need not be batch-invariant: recompute the logits a whole chunk at a time (one large
        # matmul is about twice as fast on the CPU as ROW_BLOCK-row ones).
        rows = min(T, CHUNK_ROWS)
        z = torch.empty(rows, V, dtype=torch.float32, device=hidden.device)
        logits = z if hidden.dtype == torch.float32 else torch.empty(rows, V, dtype=hidden.dtype,
                                                                      device=hidden.device)
        dz = torch.empty(rows, V, dtype=torch.float32, device=hidden.device)
        for c0 in range(0, T, CHUNK_ROWS):
            c = slice(c0, min(T, c0 + CHUNK_ROWS))
            n = c.stop - c0
            zc, d = z[:n], dz[:n]
            torch.mm(hidden[c], weight.t(), out=logits[:n])
            if logits is not z:
                zc.copy_(logits[:n])
            zc.div_(ctx.temperature)
            p = torch.sub(zc, lse[c], out=d).exp_()
            if ctx.return_entropy:  # zc <- g_entropy * p * (E - z)
                zc.neg_().add_(mean_z[c]).mul_(p).mul_(grad_entropy[c])
            d = p.mul_(grad_logp[c].neg())
            if ctx.return_entropy:
                d.add_(zc)
            d.scatter_add_(1, targets[c], grad_logp[c]).div_(ctx.temperature)
            d = d.to(weight.dtype)
            if need_hidden:
                torch.mm(d, weight, out=grad_hidden[c])
            if need_weight:
                if d.dtype == torch.float32:
                    grad_weight.addmm_(d.t(), hidden[c])
                else:
                    grad_weight += (d.t() @ hidden[c]).float()
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def head_logits_chunked(hidden, weight, temperature=1.0):
    """[T, V] fp32 logits / temperature, block for block as token_logprobs_chunked computes them (the draw and
    the reported log-prob then share one distribution)."""
    z = torch.empty(hidden.shape[0], weight.shape[0], dtype=torch.float32, device=hidden.device)
    for first, n, block in _logit_blocks(hidden, weight, temperature):
        z[first:first + n] = block[:n]
    return z


def token_logprobs_chunked(hidden, weight, targets, temperature=1.0, return_entropy=False, check_ids=True):
    """log p(targets) [T] fp32 (and the entropy [T] if return_entropy) in PyTorch, ROW_BLOCK rows at a time;
    peak extra memory O(CHUNK_ROWS x V) (in the backward)."""
    check_token_logprobs_inputs(hidden, weight, targets, temperature, check_ids)
    logp, entropy = _ChunkedTokenLogprobs.apply(hidden, weight, targets, float(temperature), return_entropy)
    return (logp, entropy) if return_entropy else logp


def varlen_attention(q, k, v, cu_seqlens, max_seqlen=None, causal=True, softmax_scale=None):
    """Attention over packed sequences: q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens int32 [B+1].
    Each sequence attends only to itself; GQA by head grouping. One SDPA call per sequence, on 4-D inputs:
    PyTorch's fused CPU (flash) kernel takes only those, and is ~4x faster than the math path 3-D ones get."""
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs = q[start:end].transpose(0, 1)[None]  # [1, Hq, L, D]
        ks = k[start:end].transpose(0, 1).repeat_interleave(hq // hkv, dim=0)[None]
        vs = v[start:end].transpose(0, 1).repeat_interleave(hq // hkv, dim=0)[None]
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale)
        out[start:end] = o[0].transpose(0, 1)
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping):
    """k/v [T, Hkv, D] into the paged caches [num_blocks, block_size, Hkv, D] at slot_mapping [T]
    (slot = block * block_size + offset; -1: already cached, skip)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep]
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep]


def paged_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, max_query_len=None,
                    softmax_scale=None):
    """The new query tokens q [T, Hq, D] of each sequence (rows cu_seqlens_q[b]:cu_seqlens_q[b+1], the last
    positions of its context_lens[b] tokens) attend causally to the sequence's keys in the paged cache.
    Sequences with one new token (decode) go through one batched SDPA call, the others one call each."""
    hq, hkv, d = q.shape[1], k_cache.shape[2], q.shape[2]
    block_size = k_cache.shape[1]
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    out = torch.empty_like(q)
    bounds, contexts = cu_seqlens_q.tolist(), context_lens.tolist()

    def gather(cache, tables, n_keys):  # [B, blocks] -> [B, Hkv, n_keys, D]
        return cache[tables].flatten(1, 2)[:, :n_keys].permute(0, 2, 1, 3)

    decode = [b for b in range(len(contexts)) if bounds[b + 1] - bounds[b] == 1]
    if decode:
        rows = torch.tensor([bounds[b] for b in decode], device=q.device)
        ctx = torch.tensor([contexts[b] for b in decode], device=q.device)
        n_keys = int(ctx.max())
        tables = block_tables[torch.tensor(decode, device=q.device), :(n_keys + block_size - 1) // block_size]
        visible = torch.arange(n_keys, device=q.device)[None, :] < ctx[:, None]
        o = F.scaled_dot_product_attention(q[rows][:, :, None], gather(k_cache, tables.long(), n_keys),
                                           gather(v_cache, tables.long(), n_keys), attn_mask=visible[:, None, None],
                                           scale=scale, enable_gqa=hq != hkv)
        out[rows] = o[:, :, 0]
    for b, (start, end, ctx) in enumerate(zip(bounds[:-1], bounds[1:], contexts)):
        if end - start <= 1:
            continue
        tables = block_tables[b:b + 1, :(ctx + block_size - 1) // block_size].long()
        q_pos = torch.arange(ctx - (end - start), ctx, device=q.device)
        visible = q_pos[:, None] >= torch.arange(ctx, device=q.device)[None, :]
        o = F.scaled_dot_product_attention(q[start:end].transpose(0, 1)[None], gather(k_cache, tables, ctx),
                                           gather(v_cache, tables, ctx), attn_mask=visible, scale=scale,
                                           enable_gqa=hq != hkv)
        out[start:end] = o[0].transpose(0, 1)
    return out


# Philox4x32-10 (Salmon et al., SC'11), the counter-based generator of cuRAND and JAX: 32-bit words held in
# int64 tensors, products split so that no intermediate exceeds 2^49 (exact on every device).
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_MASK32 = 0xFFFFFFFF


def _mulhilo32(a: torch.Tensor, m: int):
    low = a * (m & 0xFFFF)               # < 2^48
    high = a * (m >> 16)                 # < 2^48: the product is low + high * 2^16
    mid = low + ((high & 0xFFFF) << 16)  # < 2^49
    return (mid >> 32) + (high >> 16), mid & _MASK32


def philox4x32(counter: tuple, key: tuple) -> tuple:
    """Philox4x32-10 of four counter words and two key words (int64 tensors of values < 2^32)."""
    (c0, c1, c2, c3), (k0, k1) = counter, key
    for _ in range(10):
        hi0, lo0 = _mulhilo32(c0, _PHILOX_M[0])
        hi1, lo1 = _mulhilo32(c2, _PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_W[0]) & _MASK32, (k1 + _PHILOX_W[1]) & _MASK32
    return c0, c1, c2, c3


def philox_uniforms(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """One uniform number in [0, 1) (fp64, 53 random bits) per (seed, counter) pair: Philox keyed by the seed
    (int64 >= 0) at counter `counters` (int64 >= 0), so a row's number depends on nothing else."""
    seeds, counters = seeds.long(), counters.long()
    zero = torch.zeros_like(counters)
    x0, x1, _, _ = philox4x32((counters & _MASK32, counters >> 32, zero, zero), (seeds & _MASK32, seeds >> 32))
    return ((x0 >> 5) * 67108864 + (x1 >> 6)).double() * 2.0 ** -53
