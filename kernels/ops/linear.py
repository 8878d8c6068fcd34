"""Batch-invariant linear layer, x @ weight.T + bias (Triton): the "exact mode" matmul. A row's result never
depends on how many rows are computed with it, so the sampler (any batch) and the trainer (packed batches)
get the same bits: BLOCK_N and BLOCK_K fixed (no autotuning), no split-K, the K loop in one fixed order, fp32
accumulation, so every output element is the same sum in the same order whatever the tile. The M tile follows
the row count (few rows, as at decode: 16-row tiles, more CTAs) among the tiles that compile to the same
tensor-core instruction as the 128-row one on the device (block_m_choices), so that no tile asks the GPU for
other arithmetic. The backward (dx = dy @ W, dW = dy^T @ x) uses the same kernel, so dW is reduced over the
rows in a fixed order without atomics: deterministic."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from protege.kernels._validate import INTERPRETING, check_float_tensor, check_like, rows

# BLOCK_N, BLOCK_K: one for every call (they fix each element's K order). BLOCK_M: one of BLOCK_MS per call.
BLOCK_MS, BLOCK_N, BLOCK_K, GROUP_M = (16, 32, 64, 128), 128, 64, 8
INTERPRETER_SMS = 132  # the tile choice under the interpreter, as on an H100/H200 (any choice gives the same bits)


def block_m_choices(capability, dtype) -> tuple:
    """The M tiles whose code uses the tensor-core instruction of the 128-row tile, on a device of compute
    capability (major, minor) (None: the interpreter). benchmarks/gpu_compile.py checks this against the
    compiled code for sm_80 and sm_90. fp32 takes no tensor cores (fused multiply-adds in K order): any tile.
    sm_8x: mma.sync m16n8k16 at every size. sm_9x: wgmma m64n128k16 needs 64 rows a warpgroup (fewer fall back
    to mma.sync): 64 (4 warps) and 128 (8 warps). Other architectures: unchecked, the 128-row tile only."""
    if capability is None or dtype == torch.float32 or capability[0] == 8:
        return BLOCK_MS
    return (64, 128) if capability[0] == 9 else (128,)


def num_warps(block_m: int) -> int:
    return 8 if block_m == 128 else 4  # 64 rows: one warpgroup, so wgmma keeps its n128 shape


def pick_block_m(m: int, n: int, choices: tuple, n_sms: int) -> int:
    """The largest tile that still gives every SM a CTA, else the smallest: a decode step's few rows get
    small tiles and several CTAs per weight tile (reading it from L2). Only speed depends on this."""
    tiles_n = triton.cdiv(n, BLOCK_N)
    for block_m in sorted(choices, reverse=True):
        if triton.cdiv(m, block_m) * tiles_n >= n_sms:
            return block_m
    return min(choices)


@functools.lru_cache(maxsize=None)
def _device_tiles(device: torch.device, dtype: torch.dtype):
    """(M tile choices, SM count) for launches on device."""
    if INTERPRETING or device.type != "cuda":
        return block_m_choices(None, dtype), INTERPRETER_SMS
    props = torch.cuda.get_device_properties(device)
    return block_m_choices((props.major, props.minor), dtype), props.multi_processor_count


@triton.jit(do_not_specialize=["M"])  # M == 1 must compile to the same code as any other M
def _matmul_kernel(A, B, C, BIAS, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm,
                   HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE_FP32: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C[M, N] = A[M, K] @ B[K, N] (+ BIAS[N]), any strides for A and B, C row-major."""
    # Grouped tile order for L2 reuse: which program computes a tile never changes its value.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * tiles_n
    first_m = (pid // group_size) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m

    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # rows x stride can exceed 2**31
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = A + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = B + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < K - k), other=0.0)
        b = tl.load(b_ptrs, mask=(rk[:, None] < K - k) & (rn[None, :] < N), other=0.0)
        if UPCAST:  # the interpreter cannot multiply bf16; on a GPU the tensor cores take bf16/fp16 as is
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE_FP32:  # fp32 inputs stay fp32 (no TF32), as F.linear by default
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    c_ptrs = C + rm[:, None] * stride_cm + rn[None, :]
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def _matmul(a, a_strides, b, b_strides, m, n, k, bias, dtype, block_m=None):
    """[m, k] @ [k, n] (+ bias) -> [m, n] in dtype; a_strides and b_strides are (row, column) strides.
    block_m: the M tile (default: chosen for m, n and the device; the result does not depend on it)."""
    c = torch.empty((m, n), dtype=dtype, device=a.device)
    if m and n:
        if block_m is None:
            block_m = pick_block_m(m, n, *_device_tiles(a.device, dtype))
        grid = (triton.cdiv(m, block_m) * triton.cdiv(n, BLOCK_N),)
        _matmul_kernel[grid](
            a, b, c, bias if bias is not None else c, m, n, k, *a_strides, *b_strides, c.stride(0),
            HAS_BIAS=bias is not None, UPCAST=INTERPRETING,
            IEEE_FP32=dtype == torch.float32,
            BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M,
            num_warps=num_warps(block_m), num_stages=2 if dtype == torch.float32 else 3)
    return c


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        n, k = weight.shape
        x2 = rows(x, k)
        y = _matmul(x2, x2.stride(), weight, (weight.stride(1), weight.stride(0)), x2.shape[0], n, k, bias,
                    x.dtype)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return y.view(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        n, k = weight.shape
        x2, dy2 = rows(x, k), rows(dy, n)
        m = x2.shape[0]
        dx = dw = db = None
        if ctx.needs_input_grad[0]:  # dx [m, k] = dy [m, n] @ W [n, k]
            dx = _matmul(dy2, dy2.stride(), weight, weight.stride(), m, k, n, None, x.dtype).view(x.shape)
        if ctx.needs_input_grad[1]:  # dW [n, k] = dy^T [n, m] @ x [m, k]
            dw = _matmul(dy2, (dy2.stride(1), dy2.stride(0)), x2, x2.stride(), n, k, m, None, weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0, dtype=torch.float32).to(weight.dtype)
        return dx, dw, db


def linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T (+ bias [N]) -> [..., N], batch-invariant."""
    check_float_tensor("linear", "x", x)
    check_like("linear", "weight", weight, "x", x)
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not fit: expected "
                         "x [..., K] and weight [N, K]")
    if bias is not None:
        check_like("linear", "bias", bias, "x", x)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"linear: bias has shape {tuple(bias.shape)}; expected ({weight.shape[0]},)")
    return _Linear.apply(x, weight, bias)
