"""SwiGLU Triton kernel (interpreter) against the fp64 PyTorch reference."""
import pytest
import torch

from protege.kernels import reference
from protege.kernels.ops.swiglu import swiglu_triton
from protege.kernels.precision import assert_close_to_fp64

SHAPES = [(2, 4, 64), (37, 80)]  # a nice shape with leading dims, an odd one


def make_inputs(shape, dtype):
    torch.manual_seed(0)
    return (torch.randn(shape) * 4).to(dtype), torch.randn(shape).to(dtype)  # gate spans the sigmoid's range


def forward_backward(fn, gate, up, out_grad):
    gate, up = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    out = fn(gate, up)
    out.backward(out_grad.to(out.dtype))
    return out.detach(), gate.grad, up.grad


def check_against_fp64(shape, dtype):
    gate, up = make_inputs(shape, dtype)
    out_grad = torch.randn(shape, dtype=torch.float64)
    got = forward_backward(swiglu_triton, gate, up, out_grad)
    low = forward_backward(reference.swiglu, gate, up, out_grad)
    ref = forward_backward(reference.swiglu, gate.double(), up.double(), out_grad)
    for name, g, lo, r in zip(["out", "dgate", "dup"], got, low, ref):
        assert g.dtype == dtype and g.shape == r.shape, name
        assert_close_to_fp64(name, g, lo, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_forward_backward_vs_fp64(shape, dtype):
    check_against_fp64(shape, dtype)


def test_bf16_upcast_path():
    check_against_fp64(SHAPES[1], torch.bfloat16)


def test_chunks_of_a_fused_gate_up_match_contiguous():
    torch.manual_seed(0)
    gate_up = torch.randn(37, 2 * 80, dtype=torch.float16)
    gate, up = gate_up.chunk(2, dim=-1)  # views with row stride 160
    assert torch.equal(swiglu_triton(gate, up), swiglu_triton(gate.contiguous(), up.contiguous()))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy warns about the NaN it is asked to produce
def test_nan_and_inf_propagate_like_the_reference():
    inf, nan = float("inf"), float("nan")
    gate = torch.tensor([[nan, inf, -inf, -100.0, 100.0, 1.0, 0.0, 2.0]])
    up = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, nan, inf, -inf]])
    got, want = swiglu_triton(gate, up), reference.swiglu(gate, up)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    finite = want.isfinite()
    torch.testing.assert_close(got[finite], want[finite])
    assert torch.equal(got[~got.isnan()].sign(), want[~want.isnan()].sign())


def test_bad_inputs_are_named():
    gate, up = make_inputs((4, 64), torch.float32)
    with pytest.raises(ValueError, match=r"up has shape \(4, 32\) but gate has \(4, 64\)"):
        swiglu_triton(gate, up[:, :32])
    with pytest.raises(TypeError, match="up has dtype torch.float16 but gate has torch.float32"):
        swiglu_triton(gate, up.half())
    with pytest.raises(TypeError, match="gate has dtype torch.int64"):
        swiglu_triton(gate.long(), up.long())
    with pytest.raises(TypeError, match="up must be a torch.Tensor"):
        swiglu_triton(gate, 1.0)
