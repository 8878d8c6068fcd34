"""The precision rule every kernel test applies (fp64 PyTorch is the oracle; benchmarks/gpu_suite.py applies it on
a GPU too), and the bitwise batch-invariance check of the exact-mode kernels."""
import torch


def fp64_error_and_bound(out, out_torch, ref, dtype=None) -> tuple[float, float]:
    """(max error of out vs the fp64 reference, the most the rule allows). fp32: 1e-4 relative to the
    reference's scale. fp16/bf16 (the FlashAttention rule): twice the error of the same PyTorch computation at
    that dtype, plus a floor (far below an fp16 ulp; one bf16 ulp, as the interpreter truncates fp32 -> bf16
    casts) for when PyTorch happens to be exact. dtype: the computation's dtype (default: out's; an op may
    compute in bf16 and return fp32). NaN never passes."""
    dtype = dtype or out.dtype
    scale = ref.abs().max().item() or 1.0
    err = (out.double() - ref).abs().max().item()
    if err != err:
        return err, 0.0
    if dtype == torch.float32:
        return err, 1e-4 * scale
    err_torch = (out_torch.double() - ref).abs().max().item()
    floor = (2 ** -7 if dtype == torch.bfloat16 else 1e-5) * scale
    return err, 2 * err_torch + floor


def assert_close_to_fp64(name, out, out_torch, ref):
    err, bound = fp64_error_and_bound(out, out_torch, ref)
    if out.dtype == torch.float32:
        assert err <= bound, f"{name}: error {err:.3g} vs fp64 exceeds 1e-4 x {bound * 1e4:.3g}"
        return
    err_torch = (out_torch.double() - ref).abs().max().item()
    assert err <= bound, f"{name}: error {err:.3g} vs fp64, PyTorch {out.dtype} {err_torch:.3g}"


def batches_that_change_bits(fn, n_rows, sizes=(1, 5, 37), alone=(3, 36)):
    """The batches in which some row's result differs, bit for bit, from the same row's in the batch of all
    n_rows rows: the first m rows for m in sizes, and single rows (at the top of a tile instead of at position r,
    and the last row). fn(rows: slice) returns tensors with one row per input row. [] means batch-invariant."""
    full = fn(slice(0, n_rows))
    batches = [slice(0, m) for m in sizes] + [slice(r, r + 1) for r in (*alone, n_rows - 1)]
    return [(b.start, b.stop) for b in batches
            if not all(torch.equal(got, want[b]) for got, want in zip(fn(b), full))]
