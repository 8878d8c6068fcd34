"""The row-invariant interpreter dot that tests/conftest.py installs (kernels/interpreter_dot.py): it fixes each
element's K order as a GPU does, makes the host's BLAS irrelevant to the bitwise tests, and still lets those
tests catch a kernel whose reduction order depends on the batch."""
import os

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter

from protege.kernels.interpreter_dot import use_row_invariant_dot
from protege.kernels.ops.linear import linear_triton
from protege.kernels.precision import batches_that_change_bits

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="tests the CPU interpreter")


def make_inputs(m=130, k=256, n=160):  # two M tiles, two N tiles (one partial), four K steps of the real kernel
    g = torch.Generator().manual_seed(0)
    return torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) / k ** 0.5


@triton.jit
def _tile_dot(A, B, C, K: tl.constexpr, N: tl.constexpr, BLOCK_M: tl.constexpr):
    rm, rk, rn = tl.arange(0, BLOCK_M), tl.arange(0, K), tl.arange(0, N)
    a = tl.load(A + rm[:, None] * K + rk[None, :])
    b = tl.load(B + rk[:, None] * N + rn[None, :])
    tl.store(C + rm[:, None] * N + rn[None, :], tl.dot(a, b, input_precision="ieee"))


def test_dot_gives_a_row_the_same_bits_at_any_position_in_any_tile():
    assert interpreter.InterpreterBuilder.create_dot.row_invariant  # installed by tests/conftest.py
    a, b = torch.randn(64, 64), torch.randn(64, 128)
    full = torch.empty(64, 128)
    _tile_dot[(1,)](a, b, full, K=64, N=128, BLOCK_M=64)
    for r in (1, 17, 40, 63):
        for block_m, at in ((64, 0), (64, 33), (16, 5)):
            tile = torch.randn(block_m, 64)
            tile[at] = a[r]
            out = torch.empty(block_m, 128)
            _tile_dot[(1,)](tile, b, out, K=64, N=128, BLOCK_M=block_m)
            assert torch.equal(out[at], full[r]), (r, block_m, at)
    torch.testing.assert_close(full, a @ b, rtol=1e-5, atol=1e-5)


def row_dependent_matmul(real):
    """numpy's matmul, then 1 ulp up on the rows at odd positions of the tile: what this kind of BLAS does."""
    def matmul(a, b, *args, **kwargs):
        c = real(a, b, *args, **kwargs)
        odd = np.arange(c.shape[-2]) % 2 == 1
        return np.where(odd[:, None], np.nextafter(c, np.inf), c).astype(c.dtype)
    return matmul


def test_host_blas_is_irrelevant_to_the_bitwise_checks(monkeypatch):
    """With a BLAS that rounds by row position, the interpreter's own dot makes the real (batch-invariant) linear
    kernel look batch-dependent; the session's dot does not use the BLAS, so the check stays about the kernel."""
    x, w = make_inputs()
    forward = lambda rows: (linear_triton(x[rows], w),)  # noqa: E731
    monkeypatch.setattr(np, "matmul", row_dependent_matmul(np.matmul))
    assert batches_that_change_bits(forward, 130) == []
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot",
                        interpreter.InterpreterBuilder.create_dot.original)
    assert batches_that_change_bits(forward, 130) != []  # rows 3 and 129 move from an odd position to row 0


@triton.jit
def _split_k_matmul(A, B, P, M, N, K, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """P[s] = A[:, ks] @ B[ks, :] over the s-th of SPLIT_K slices of K (A [M, K], B [K, N] row-major)."""
    pid_m, pid_n, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    per_split = K // SPLIT_K
    for k in range(s * per_split, (s + 1) * per_split, BLOCK_K):
        a = tl.load(A + rm[:, None] * K + (k + rk)[None, :], mask=rm[:, None] < M, other=0.0)
        b = tl.load(B + (k + rk)[:, None] * N + rn[None, :], mask=rn[None, :] < N, other=0.0)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(P + s * M * N + rm[:, None] * N + rn[None, :], acc, mask=mask)


def split_k_linear(x, w):
    """x @ w.T with the same tiles as kernels/ops/linear.py, but split-K (two partial sums over halves of K,
    added at the end) when there are few rows to fill the GPU with, as cuBLAS does: batch-dependent."""
    m, k = x.shape
    n = w.shape[0]
    split = 2 if m < 16 else 1
    partial = torch.empty(split, m, n)
    grid = (triton.cdiv(m, 128), triton.cdiv(n, 128), split)
    _split_k_matmul[grid](x, w.t().contiguous(), partial, m, n, k, SPLIT_K=split, BLOCK_M=128, BLOCK_N=128,
                          BLOCK_K=64)
    return partial.sum(0)


def test_the_bitwise_check_catches_a_batch_dependent_kernel():
    x, w = make_inputs()
    torch.testing.assert_close(split_k_linear(x, w), x @ w.t(), rtol=1e-5, atol=1e-5)  # a correct matmul
    split_k = batches_that_change_bits(lambda rows: (split_k_linear(x[rows], w),), 130)
    assert split_k == [(0, 1), (0, 5), (3, 4), (36, 37), (129, 130)]  # every batch of fewer than 16 rows
    assert batches_that_change_bits(lambda rows: (linear_triton(x[rows], w),), 130) == []


def test_an_unexpected_interpreter_fails_loudly(monkeypatch):
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", lambda self, a, b, d: None)
    with pytest.raises(RuntimeError, match="port kernels/interpreter_dot.py"):
        use_row_invariant_dot()
    monkeypatch.delattr(interpreter.InterpreterBuilder, "create_dot")
    with pytest.raises(RuntimeError, match="no InterpreterBuilder.create_dot"):
        use_row_invariant_dot()
