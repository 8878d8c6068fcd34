"""SwiGLU, silu(gate) * up (Triton). Rounds like PyTorch's F.silu(gate) * up: silu cast to the activation
dtype, then the product. The backward recomputes the sigmoid from the saved gate and up."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from protege.kernels._validate import check_float_tensor, check_like, rows


@triton.jit
def _swiglu_fwd(GATE, UP, OUT, stride_g, stride_u, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # rows x columns can exceed 2**31
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(GATE + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(OUT.dtype.element_ty).to(tl.float32)
    tl.store(OUT + row * n_cols + cols, (silu * u).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(DOUT, GATE, UP, DGATE, DUP, stride_d, stride_g, stride_u, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dout = tl.load(DOUT + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    silu = g * sig
    # d silu / dg = sig + g * sig * (1 - sig) = sig * (1 + g * (1 - sig))
    dgate = dout * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(DGATE + row * n_cols + cols, dgate.to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + row * n_cols + cols, (dout * silu).to(DUP.dtype.element_ty), mask=mask)


def _launch(kernel, n_rows, n_cols, *args):
    block = min(triton.next_power_of_2(n_cols), 4096)
    if n_rows and n_cols:
        kernel[(n_rows, triton.cdiv(n_cols, block))](*args, n_cols, BLOCK=block, num_warps=4 if block <= 1024 else 8)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        n_cols = gate.shape[-1]
        g, u = rows(gate, n_cols), rows(up, n_cols)
        out = torch.empty(g.shape, dtype=gate.dtype, device=gate.device)
        _launch(_swiglu_fwd, g.shape[0], n_cols, g, u, out, g.stride(0), u.stride(0))
        ctx.save_for_backward(gate, up)
        return out.view(gate.shape)

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        n_cols = gate.shape[-1]
        d, g, u = rows(dout, n_cols), rows(gate, n_cols), rows(up, n_cols)
        dgate = torch.empty(g.shape, dtype=gate.dtype, device=gate.device)
        dup = torch.empty_like(dgate)
        _launch(_swiglu_bwd, g.shape[0], n_cols, d, g, u, dgate, dup, d.stride(0), g.stride(0), u.stride(0))
        return dgate.view(gate.shape), dup.view(gate.shape)


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    check_float_tensor("swiglu", "gate", gate)
    check_like("swiglu", "up", up, "gate", gate)
    if up.shape != gate.shape:
        raise ValueError(f"swiglu: up has shape {tuple(up.shape)} but gate has {tuple(gate.shape)}")
    if gate.dim() == 0:
        raise ValueError("swiglu: gate must have at least one dimension, got a 0-d tensor")
    return _SwiGLU.apply(gate, up)
