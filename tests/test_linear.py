"""Batch-invariant linear Triton kernel (interpreter) against the fp64 PyTorch reference."""
import pytest
import torch
import torch.nn.functional as F

from protege.kernels import _validate
from protege.kernels.ops.linear import linear_triton
from protege.kernels.precision import assert_close_to_fp64, batches_that_change_bits

# (x shape, out features, bias): a nice shape with leading dims; an odd one spanning two N tiles and a
# K remainder
SHAPES = [((2, 8, 64), 128, False), ((37, 80), 160, True)]


def make_inputs(x_shape, n, bias, dtype):
    torch.manual_seed(0)
    k = x_shape[-1]
    x = torch.randn(x_shape).to(dtype)
    weight = (torch.randn(n, k) / k ** 0.5).to(dtype)
    return [x, weight, torch.randn(n).to(dtype)] if bias else [x, weight]


def forward_backward(fn, inputs, out_grad):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(out_grad.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def check_against_fp64(x_shape, n, bias, dtype):
    inputs = make_inputs(x_shape, n, bias, dtype)
    out_grad = torch.randn(*x_shape[:-1], n, dtype=torch.float64)
    got = forward_backward(linear_triton, inputs, out_grad)
    low = forward_backward(F.linear, inputs, out_grad)
    ref = forward_backward(F.linear, [t.double() for t in inputs], out_grad)
    for name, g, lo, r in zip(["y", "dx", "dweight", "dbias"], got, low, ref):
        assert g.dtype == dtype and g.shape == r.shape, name
        assert_close_to_fp64(name, g, lo, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("x_shape,n,bias", SHAPES)
def test_linear_forward_backward_vs_fp64(x_shape, n, bias, dtype):
    check_against_fp64(x_shape, n, bias, dtype)


def test_bf16_upcast_path():
    check_against_fp64(*SHAPES[1], torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_gets_the_same_bits_in_any_batch(dtype):
    x, weight, bias = make_inputs((130, 80), 160, True, dtype)  # 130 rows: two M tiles
    dy = torch.randn(130, 160).to(dtype)

    def forward_and_dx(rows):
        xr = x[rows].clone().requires_grad_()
        y = linear_triton(xr, weight, bias)
        y.backward(dy[rows])
        return y.detach(), xr.grad

    assert batches_that_change_bits(forward_and_dx, 130) == []  # rows 3, 36, 129 alone: at the top of a tile


def test_strided_and_transposed_operands_match_contiguous():
    x, _, bias = make_inputs((37, 80), 160, True, torch.float16)
    wide = torch.randn(37, 96).to(torch.float16)
    x = wide[:, :80]  # rows 96 apart
    weight = torch.randn(80, 160).to(torch.float16).t()  # column-major
    assert torch.equal(linear_triton(x, weight, bias), linear_triton(x.contiguous(), weight.contiguous(), bias))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy warns about the NaN it is asked to produce
def test_nan_and_inf_propagate_like_the_reference():
    x, weight = make_inputs((6, 80), 160, False, torch.float32)
    x[1, 3] = float("nan")
    x[4, 7] = float("inf")
    got, want = linear_triton(x, weight), F.linear(x, weight)
    assert got[1].isnan().all()
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    finite = want.isfinite()
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_named(monkeypatch):
    x, weight, bias = make_inputs((4, 64), 32, True, torch.float32)
    with pytest.raises(ValueError, match=r"x \(4, 64\) and weight \(32, 63\) do not fit"):
        linear_triton(x, weight[:, :63])
    with pytest.raises(ValueError, match="do not fit"):
        linear_triton(x, weight[0])
    with pytest.raises(ValueError, match=r"bias has shape \(31,\); expected \(32,\)"):
        linear_triton(x, weight, bias[:31])
    with pytest.raises(TypeError, match="weight has dtype torch.float16 but x has torch.float32"):
        linear_triton(x, weight.half())
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        linear_triton(x, weight.to("meta"))
    monkeypatch.setattr(_validate, "INTERPRETING", False)
    with pytest.raises(ValueError, match="x is on cpu; the Triton kernels need a CUDA tensor"):
        linear_triton(x, weight)
