"""RMSNorm and fused add + RMSNorm Triton kernels (interpreter) against the fp64 PyTorch reference."""
import pytest
import torch

from protege.kernels import reference
from protege.kernels.ops.rms_norm import add_rms_norm_triton, rms_norm_triton
from protege.kernels.precision import assert_close_to_fp64

EPS = 1e-6
SHAPES = [(2, 8, 64), (37, 80)]  # a nice shape with leading dims, an odd one


def rms_norm_fp64(x, weight, eps):
    # reference.rms_norm computes in fp32 whatever the input dtype; this one is all fp64
    x = x.double()
    return weight.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def add_rms_norm_fp64(x, residual, weight, eps):
    s = x.double() + residual.double()
    return rms_norm_fp64(s, weight, eps), s


def forward_backward(fn, inputs, out_grads):
    """Outputs and input gradients of fn(*inputs, EPS) for the given output gradients."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*leaves, EPS)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, out_grads)])
    return [o.detach() for o in outs] + [t.grad for t in leaves]


def check_against_fp64(triton_fn, torch_fn, fp64_fn, inputs, n_outputs, names):
    out_grads = [torch.randn(inputs[0].shape, dtype=torch.float64) for _ in range(n_outputs)]
    got = forward_backward(triton_fn, inputs, out_grads)
    low = forward_backward(torch_fn, inputs, out_grads)
    ref = forward_backward(fp64_fn, [t.double() for t in inputs], out_grads)
    for name, g, lo, r in zip(names, got, low, ref):
        assert g.dtype == inputs[0].dtype and g.shape == r.shape, name
        assert_close_to_fp64(name, g, lo, r)


def make_inputs(shape, dtype, residual=False):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 3).to(dtype)
    weight = (1 + 0.5 * torch.randn(shape[-1])).to(dtype)
    return [x, (torch.randn(shape) * 3).to(dtype), weight] if residual else [x, weight]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_forward_backward_vs_fp64(shape, dtype):
    check_against_fp64(rms_norm_triton, reference.rms_norm, rms_norm_fp64, make_inputs(shape, dtype), 1,
                       ["y", "dx", "dweight"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_add_rms_norm_forward_backward_vs_fp64(shape, dtype):
    check_against_fp64(add_rms_norm_triton, reference.add_rms_norm, add_rms_norm_fp64,
                       make_inputs(shape, dtype, residual=True), 2,
                       ["y", "sum", "dx", "dresidual", "dweight"])


def test_bf16_upcast_path():
    check_against_fp64(rms_norm_triton, reference.rms_norm, rms_norm_fp64, make_inputs((37, 80), torch.bfloat16), 1,
                       ["y", "dx", "dweight"])
    check_against_fp64(add_rms_norm_triton, reference.add_rms_norm, add_rms_norm_fp64,
                       make_inputs((37, 80), torch.bfloat16, residual=True), 2,
                       ["y", "sum", "dx", "dresidual", "dweight"])


def test_only_the_sum_used_downstream():
    x, residual, weight = [t.requires_grad_() for t in make_inputs((5, 64), torch.float32, residual=True)]
    _, s = add_rms_norm_triton(x, residual, weight, EPS)
    s.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x)) and torch.equal(residual.grad, torch.ones_like(x))
    assert weight.grad is None


def test_gradients_accumulate_into_x_and_residual_separately():
    x, residual, weight = [t.requires_grad_() for t in make_inputs((5, 64), torch.float32, residual=True)]
    for _ in range(2):
        y, s = add_rms_norm_triton(x, residual, weight, EPS)
        (y.sum() + s.sum()).backward()
    ref = [t.detach().clone().requires_grad_() for t in (x, residual, weight)]
    for _ in range(2):
        y, s = reference.add_rms_norm(*ref, EPS)
        (y.sum() + s.sum()).backward()
    assert x.grad.data_ptr() != residual.grad.data_ptr()
    for got, want in zip((x.grad, residual.grad, weight.grad), (t.grad for t in ref)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_strided_rows_match_contiguous():
    x, weight = make_inputs((9, 96), torch.float16)
    view = x[:, :80]  # rows 96 apart
    assert torch.equal(rms_norm_triton(view, weight[:80], EPS), rms_norm_triton(view.contiguous(), weight[:80], EPS))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy warns about the NaN it is asked to produce
def test_nan_and_inf_propagate_like_the_reference():
    x, weight = make_inputs((6, 80), torch.float32)
    x[1, 3] = float("nan")
    x[4, 7] = float("inf")
    got, want = rms_norm_triton(x, weight, EPS), reference.rms_norm(x, weight, EPS)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    assert got[1].isnan().all()  # one NaN poisons its row's statistics
    finite = want.isfinite()
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_named():
    x, weight = make_inputs((4, 64), torch.float32)
    with pytest.raises(ValueError, match=r"weight has shape \(63,\)"):
        rms_norm_triton(x, weight[:63], EPS)
    with pytest.raises(TypeError, match="weight has dtype torch.float16 but x has torch.float32"):
        rms_norm_triton(x, weight.half(), EPS)
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        rms_norm_triton(x.long(), weight, EPS)
    with pytest.raises(ValueError, match="eps must be a non-negative number"):
        rms_norm_triton(x, weight, -1.0)
    with pytest.raises(ValueError, match=r"residual has shape \(4, 32\)"):
        add_rms_norm_triton(x, x[:, :32], weight, EPS)
    with pytest.raises(TypeError, match="residual has dtype torch.float16"):
        add_rms_norm_triton(x, x.half(), weight, EPS)
    with pytest.raises(ValueError, match="hidden size 65537 exceeds"):
        rms_norm_triton(torch.zeros(1, 65537), torch.zeros(65537), EPS)
