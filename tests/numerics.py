"""The precision rule every kernel test applies (fp64 PyTorch is the oracle)."""
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
