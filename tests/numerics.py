"""The precision rule every kernel test applies (fp64 PyTorch is the oracle), and the bitwise batch-invariance
check of the exact-mode kernels."""
import torch


def assert_close_to_fp64(name, out, out_torch, ref):
    """fp32: max error <= 1e-4 relative to the reference's scale. fp16/bf16 (the FlashAttention rule): at most
    twice the error of the same PyTorch computation at that dtype, plus a floor (far below an fp16 ulp; one
    bf16 ulp, as the interpreter truncates fp32 -> bf16 casts) for when PyTorch happens to be exact."""
    scale = ref.abs().max().item() or 1.0
    err = (out.double() - ref).abs().max().item()
    if out.dtype == torch.float32:
        assert err <= 1e-4 * scale, f"{name}: error {err:.3g} vs fp64 exceeds 1e-4 x {scale:.3g}"
        return
    err_torch = (out_torch.double() - ref).abs().max().item()
    floor = (2 ** -7 if out.dtype == torch.bfloat16 else 1e-5) * scale
    assert err <= 2 * err_torch + floor, f"{name}: error {err:.3g} vs fp64, PyTorch {out.dtype} {err_torch:.3g}"


def batches_that_change_bits(fn, n_rows, sizes=(1, 5, 37), alone=(3, 36)):
    """The batches in which some row's result differs, bit for bit, from the same row's in the batch of all
    n_rows rows: the first m rows for m in sizes, and single rows (at the top of a tile instead of at position r,
    and the last row). fn(rows: slice) returns tensors with one row per input row. [] means batch-invariant."""
    full = fn(slice(0, n_rows))
    batches = [slice(0, m) for m in sizes] + [slice(r, r + 1) for r in (*alone, n_rows - 1)]
    return [(b.start, b.stop) for b in batches
            if not all(torch.equal(got, want[b]) for got, want in zip(fn(b), full))]
