"""RMSNorm and fused residual-add + RMSNorm (Triton), with HF Qwen2's rounding: statistics in fp32, the
normalised value cast to the activation dtype, then multiplied by the weight."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from protege.kernels._validate import check_float_tensor, check_like, rows

MAX_HIDDEN = 65536  # one row lives in registers


@triton.jit
def _rms_norm_fwd(X, R, W, Y, S, RSTD, stride_x, stride_r, stride_y, stride_s, n_cols, eps,
                  HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(S.dtype.element_ty)  # rounded like PyTorch's x + residual
        tl.store(S + row * stride_s + cols, s, mask=mask)
        x = s.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    normed = (x * rstd).to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (w * normed).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd(DY, DS, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_ds, stride_x, stride_dx,
                  n_rows, n_cols, rows_per_program, HAS_DS: tl.constexpr, BLOCK: tl.constexpr):
    # Each program takes a contiguous run of rows and keeps its share of dW in fp32 registers: the
    # partial sums are added in a fixed order afterwards (deterministic, no atomics).
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    # int64 row offsets: rows x hidden can exceed 2**31
    DY += first.to(tl.int64) * stride_dy
    DS += first.to(tl.int64) * stride_ds
    X += first.to(tl.int64) * stride_x
    DX += first.to(tl.int64) * stride_dx
    for row in range(first, last):
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = x * rstd
        dw += dy * xhat.to(DX.dtype.element_ty).to(tl.float32)  # the weight multiplied the rounded value
        dxhat = dy * w
        dx = rstd * (dxhat - xhat * (tl.sum(dxhat * xhat, axis=0) / n_cols))
        if HAS_DS:  # the residual sum is also an output: its gradient adds in
            dx += tl.load(DS + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + cols, dx.to(DX.dtype.element_ty), mask=mask)
        X += stride_x
        DY += stride_dy
        DS += stride_ds
        DX += stride_dx
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=mask)


def _launch_config(n_cols: int):
    block = triton.next_power_of_2(n_cols)
    return block, 4 if block <= 1024 else 8 if block <= 4096 else 16


def _forward(x, residual, weight, eps):
    n_cols = x.shape[-1]
    x2 = rows(x, n_cols)
    r2 = rows(residual, n_cols) if residual is not None else x2
    n_rows = x2.shape[0]
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    s = torch.empty_like(y) if residual is not None else y
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows:
        block, num_warps = _launch_config(n_cols)
        _rms_norm_fwd[(n_rows,)](x2, r2, weight, y, s, rstd, x2.stride(0), r2.stride(0), y.stride(0),
                                 s.stride(0), n_cols, eps, HAS_RESIDUAL=residual is not None, BLOCK=block,
                                 num_warps=num_warps)
    return y.view(x.shape), s.view(x.shape), rstd


def _programs(n_rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        return min(n_rows, torch.cuda.get_device_properties(device).multi_processor_count)
    return min(n_rows, 4)  # the interpreter: few programs, each looping over its rows


def _backward(dy, ds, x, weight, rstd):
    """-> (dx, dweight) for y = rms_norm(x), plus ds (the gradient of x itself as an output) if given."""
    n_cols = x.shape[-1]
    x2 = rows(x, n_cols)
    dy2 = rows(dy, n_cols)
    ds2 = rows(ds, n_cols) if ds is not None else dy2
    n_rows = x2.shape[0]
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    programs = _programs(n_rows, x.device)
    dw_partial = torch.zeros((max(programs, 1), n_cols), dtype=torch.float32, device=x.device)
    if n_rows:
        block, num_warps = _launch_config(n_cols)
        _rms_norm_bwd[(programs,)](dy2, ds2, x2, weight, rstd, dx, dw_partial, dy2.stride(0), ds2.stride(0),
                                   x2.stride(0), dx.stride(0), n_rows, n_cols, triton.cdiv(n_rows, programs),
                                   HAS_DS=ds is not None, BLOCK=block, num_warps=num_warps)
    return dx.view(x.shape), dw_partial.sum(0).to(weight.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, _, rstd = _forward(x, None, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = _backward(dy, None, x, weight, rstd)
        return dx, dw, None


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        y, s, rstd = _forward(x, residual, weight, eps)
        ctx.save_for_backward(s, weight, rstd)
        ctx.set_materialize_grads(False)
        return y, s

    @staticmethod
    def backward(ctx, dy, ds):
        s, weight, rstd = ctx.saved_tensors
        if dy is None:  # only the sum was used downstream
            return ds, ds, None, None
        dsum, dw = _backward(dy, ds, s, weight, rstd)
        # x and residual enter only through their sum: both get its gradient
        return dsum, dsum, dw, None


def _check(op, x, weight, eps):
    check_float_tensor(op, "x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have a non-empty last (hidden) dimension, got shape {tuple(x.shape)}")
    if x.shape[-1] > MAX_HIDDEN:
        raise ValueError(f"{op}: hidden size {x.shape[-1]} exceeds the kernel's limit of {MAX_HIDDEN}")
    check_like(op, "weight", weight, "x", x)
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"{op}: weight has shape {tuple(weight.shape)}; expected ({x.shape[-1]},) "
                         "(the hidden size of x)")
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"{op}: eps must be a non-negative number, got {eps!r}")


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    _check("rms_norm", x, weight, eps)
    return _RMSNorm.apply(x, weight.contiguous(), float(eps))


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """-> (rms_norm(x + residual), x + residual)"""
    _check("add_rms_norm", x, weight, eps)
    check_like("add_rms_norm", "residual", residual, "x", x)
    if residual.shape != x.shape:
        raise ValueError(f"add_rms_norm: residual has shape {tuple(residual.shape)} but x has "
                         f"{tuple(x.shape)}")
    return _AddRMSNorm.apply(x, residual, weight.contiguous(), float(eps))
