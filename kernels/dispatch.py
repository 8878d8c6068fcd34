"""Fused ops of the engine. Each public function runs a Triton kernel or its PyTorch reference
(kernels/reference.py), chosen per call: PROTEGE_KERNELS=triton|torch if set, else Triton on CUDA tensors
and PyTorch elsewhere. (On the CPU the Triton path needs TRITON_INTERPRET=1 set before import.)"""
from __future__ import annotations

import contextlib
import os

import torch

from protege.kernels import reference

_BACKENDS = ("triton", "torch")


def backend_for(t: torch.Tensor) -> str:
    """The backend an op on tensor `t` uses."""
    forced = os.environ.get("PROTEGE_KERNELS", "").strip().lower()
    if forced:
        if forced not in _BACKENDS:
            raise ValueError(f"PROTEGE_KERNELS={forced!r}: expected one of {', '.join(_BACKENDS)}")
        return forced
    return "triton" if t.is_cuda else "torch"


def use_triton(t: torch.Tensor) -> bool:
    return backend_for(t) == "triton"


def on_device(t):
    """Where an op on `t` launches: Triton launches on the current CUDA device, whatever the tensor's, so a
    thread whose current device is another GPU's (a sampler thread, a second rank's) switches for the call."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def rms_norm(x, weight, eps):
    if use_triton(x):
        from protege.kernels.ops.rms_norm import rms_norm_triton
        with on_device(x):
            return rms_norm_triton(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def add_rms_norm(x, residual, weight, eps):
    """-> (rms_norm(x + residual), x + residual)"""
    if use_triton(x):
        from protege.kernels.ops.rms_norm import add_rms_norm_triton
        with on_device(x):
            return add_rms_norm_triton(x, residual, weight, eps)
    return reference.add_rms_norm(x, residual, weight, eps)


def apply_rope(q, k, positions, theta):
    if use_triton(q):
        from protege.kernels.ops.rope import apply_rope_triton
        with on_device(q):
            return apply_rope_triton(q, k, positions, theta)
    return reference.apply_rope(q, k, positions, theta)


def swiglu(gate, up):
    if use_triton(gate):
        from protege.kernels.ops.swiglu import swiglu_triton
        with on_device(gate):
            return swiglu_triton(gate, up)
    return reference.swiglu(gate, up)


def token_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False, check_ids=True):
    if use_triton(hidden):
        from protege.kernels.ops.token_logprobs import token_logprobs_triton
        with on_device(hidden):
            return token_logprobs_triton(hidden, weight, targets, temperature, return_entropy, check_ids)
    return reference.token_logprobs_chunked(hidden, weight, targets, temperature, return_entropy, check_ids)


def head_logits(hidden, weight, temperature=1.0):
    """fp32 logits / temperature of every row, exactly as token_logprobs computes them."""
    if use_triton(hidden):
        from protege.kernels.ops.token_logprobs import head_logits_triton
        with on_device(hidden):
            return head_logits_triton(hidden, weight, temperature)
    return reference.head_logits_chunked(hidden, weight, temperature)


def logprobs_from_logits(z, targets):
    """log p(targets) from head_logits' z: bit for bit what token_logprobs reports for the same rows (the
    sampler's draw and its log-prob from one pass over the LM head). Targets must be in range (unchecked)."""
    if use_triton(z):
        from protege.kernels.ops.token_logprobs import logprobs_from_logits_triton
        with on_device(z):
            return logprobs_from_logits_triton(z, targets)
    return reference.logprobs_from_logits_chunked(z, targets)


def philox_uniforms(seeds, counters):
    """A uniform fp64 number in [0, 1) per row, a function of (seeds[i], counters[i]) only (Philox4x32-10)."""
    if use_triton(seeds):
        from protege.kernels.ops.philox import philox_uniforms_triton
        with on_device(seeds):
            return philox_uniforms_triton(seeds, counters)
    return reference.philox_uniforms(seeds, counters)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen=None, causal=True, softmax_scale=None):
    if use_triton(q):
        from protege.kernels.ops.attention import varlen_attention_triton
        with on_device(q):
            return varlen_attention_triton(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale)
    return reference.varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale)


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping):
    """k/v [T, Hkv, D] into the paged KV caches [num_blocks, block_size, Hkv, D] at slot_mapping (-1: skip)."""
    if use_triton(k):
        from protege.kernels.ops.paged_attention import write_kv_cache_triton
        with on_device(k):
            return write_kv_cache_triton(k, v, k_cache, v_cache, slot_mapping)
    return reference.write_kv_cache(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, max_query_len,
                    softmax_scale=None, match_training=True):
    """New query tokens of each sequence over its keys in the paged KV cache (decode and chunked prefill).
    match_training: Triton tiles as the training attention's (bit-identical rows), else faster decode tiles
    with split-KV (rows still independent of the batch, not the trainer's bits)."""
    if use_triton(q):
        from protege.kernels.ops.paged_attention import paged_attention_triton
        with on_device(q):
            return paged_attention_triton(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens,
                                      max_query_len, softmax_scale, match_training)
    return reference.paged_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens,
                                     max_query_len, softmax_scale)


def linear(x, weight, bias=None):
    """Batch-invariant matmul on the Triton path (a row's result never depends on the other rows)."""
    if use_triton(x):
        from protege.kernels.ops.linear import linear_triton
        with on_device(x):
            return linear_triton(x, weight, bias)
    return reference.linear(x, weight, bias)


__all__ = ["backend_for", "use_triton", "rms_norm", "add_rms_norm", "apply_rope", "swiglu",
           "token_logprobs", "varlen_attention", "write_kv_cache", "paged_attention", "linear", "reference"]

