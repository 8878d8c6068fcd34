"""A row-invariant tl.dot for the Triton CPU interpreter (TRITON_INTERPRET=1).

The interpreter runs tl.dot as numpy's matmul, i.e. the host's BLAS, and some BLAS kernels (OpenBLAS Haswell
on an AMD EPYC, for one) round a row of a tile differently depending on where the row sits in the tile. A
bitwise batch-invariance test then passes or fails with the host, and says nothing about the GPU, where each
output element of a tensor-core tile is accumulated in an order fixed by the kernel, whatever its row.

use_row_invariant_dot() replaces the interpreter's dot with one that behaves like the hardware in that
respect: element (i, j) is computed from row i of A, column j of B and acc[i, j] only, summing the products
in float64 in the order k = 0, 1, ..., K-1 (exact products, one fixed-order sum, rounded once to the
accumulator's dtype), then adding acc as the interpreter does. Only the order (and precision) of the sum
changes; a kernel whose own K-reduction order depends on the batch (split-K, tiles chosen by M) still gives
batch-dependent bits. tests/conftest.py applies it for the test session; a script that checks kernels bitwise
in the interpreter can call it too.
"""
from __future__ import annotations

import inspect

import numpy as np

_EXPECTED = ["self", "a", "b", "d", "input_precision", "max_num_imprecise_acc"]


def _row_invariant_dot(original, handle):
    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        x, y, acc = a.data, b.data, d.data
        if not all(np.issubdtype(t.dtype, np.floating) for t in (x, y, acc)):
            # Integer dots are exact (order-free); bf16/fp8 arrive as raw bits, which the interpreter handles.
            return original(self, a, b, d, input_precision, max_num_imprecise_acc)
        x, y = x.astype(np.float64), y.astype(np.float64)
        s = np.zeros(x.shape[:-1] + y.shape[-1:], np.float64)
        for k in range(x.shape[-1]):  # elementwise ops: each element rounds on its own, in this order
            s += x[..., :, k, None] * y[..., None, k, :]
        return handle(s.astype(acc.dtype) + acc, d.dtype.scalar)

    create_dot.row_invariant, create_dot.original = True, original
    return create_dot


def use_row_invariant_dot() -> None:
    """Make the interpreter's tl.dot row-invariant (idempotent). Raises if this Triton's interpreter does not
    look as expected, rather than leave the host's BLAS in place unnoticed."""
    try:
        from triton.runtime import interpreter
        builder, handle = interpreter.InterpreterBuilder, interpreter.TensorHandle
        original = builder.create_dot
    except (ImportError, AttributeError) as e:
        raise RuntimeError(f"use_row_invariant_dot: this Triton's interpreter has no InterpreterBuilder.create_dot "
                           f"/ TensorHandle ({e}); port kernels/interpreter_dot.py to it") from e
    if getattr(original, "row_invariant", False):
        return
    params = list(inspect.signature(original).parameters)
    if params != _EXPECTED:
        raise RuntimeError(f"use_row_invariant_dot: InterpreterBuilder.create_dot{tuple(params)} differs from the "
                           f"expected {tuple(_EXPECTED)}; port kernels/interpreter_dot.py to this Triton")
    builder.create_dot = _row_invariant_dot(original, handle)
