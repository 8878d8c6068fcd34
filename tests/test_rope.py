"""Rotary embedding Triton kernel (interpreter) against the fp64 PyTorch reference."""
import pytest
import torch

from protege.kernels import reference
from protege.kernels.ops.rope import apply_rope_triton
from protege.kernels.precision import assert_close_to_fp64

THETA = 1e6
# (tokens, q heads, kv heads, head_dim): a nice shape and an odd one with 7:1 GQA
SHAPES = [(16, 4, 2, 32), (37, 7, 1, 64)]


def rope_fp64(q, k, positions, theta):
    # reference.apply_rope rotates in fp32 whatever the input dtype; this one rotates in fp64. The angles
    # stay fp32 numbers (the op's definition, as HF): fp32 positions times fp32 inv_freq.
    angles = positions.float()[:, None] * reference.rope_inv_freq(q.shape[-1], theta)[None, :]
    cos, sin = angles.double().cos()[:, None, :], angles.double().sin()[:, None, :]

    def rotate(x):
        x1, x2 = x.double().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    return rotate(q), rotate(k)


def make_inputs(shape, dtype):
    torch.manual_seed(0)
    tokens, hq, hkv, d = shape
    # two packed sequences (positions restart) plus far positions, where fp32 angles matter most
    positions = torch.cat([torch.arange(tokens - tokens // 2), torch.arange(tokens // 2) + 32000])
    return torch.randn(tokens, hq, d).to(dtype), torch.randn(tokens, hkv, d).to(dtype), positions


def forward_backward(fn, q, k, positions, out_grads):
    q, k = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    outs = fn(q, k, positions, THETA)
    torch.autograd.backward(outs, [g.to(q.dtype) for g in out_grads])
    return [o.detach() for o in outs] + [q.grad, k.grad]


def check_against_fp64(shape, dtype):
    q, k, positions = make_inputs(shape, dtype)
    out_grads = [torch.randn(q.shape, dtype=torch.float64), torch.randn(k.shape, dtype=torch.float64)]
    got = forward_backward(apply_rope_triton, q, k, positions, out_grads)
    low = forward_backward(reference.apply_rope, q, k, positions, out_grads)
    ref = forward_backward(rope_fp64, q.double(), k.double(), positions, out_grads)
    for name, g, lo, r in zip(["q", "k", "dq", "dk"], got, low, ref):
        assert g.dtype == dtype and g.shape == r.shape, name
        assert_close_to_fp64(name, g, lo, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_rope_forward_backward_vs_fp64(shape, dtype):
    check_against_fp64(shape, dtype)


def test_bf16_upcast_path():
    check_against_fp64(SHAPES[1], torch.bfloat16)


def test_returns_new_tensors_and_leaves_inputs_alone():
    q, k, positions = make_inputs(SHAPES[0], torch.float32)
    q0, k0 = q.clone(), k.clone()
    q_rot, k_rot = apply_rope_triton(q, k, positions, THETA)
    assert torch.equal(q, q0) and torch.equal(k, k0)
    assert q_rot.data_ptr() != q.data_ptr() and k_rot.data_ptr() != k.data_ptr()


def test_strided_views_of_a_fused_qkv_match_contiguous():
    tokens, hq, hkv, d = SHAPES[1]
    torch.manual_seed(0)
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d)
    q = qkv[:, :hq * d].view(tokens, hq, d)  # token stride (hq + 2 hkv) d, not hq d
    k = qkv[:, hq * d:(hq + hkv) * d].view(tokens, hkv, d)
    positions = torch.arange(tokens, dtype=torch.int32)
    got = apply_rope_triton(q, k, positions, THETA)
    want = apply_rope_triton(q.contiguous(), k.contiguous(), positions, THETA)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy warns about the NaN it is asked to produce
def test_nan_propagates_like_the_reference():
    q, k, positions = make_inputs(SHAPES[0], torch.float32)
    q[3, 1, 5] = float("nan")
    k[7, 0, 20] = float("inf")
    got, want = apply_rope_triton(q, k, positions, THETA), reference.apply_rope(q, k, positions, THETA)
    for g, w in zip(got, want):
        assert torch.equal(g.isnan(), w.isnan()) and torch.equal(g.isinf(), w.isinf())
        finite = w.isfinite()
        torch.testing.assert_close(g[finite], w[finite], rtol=1e-5, atol=1e-6)
    assert got[0].isnan().sum() == 2  # the NaN reaches its rotation partner only


def test_bad_inputs_are_named():
    q, k, positions = make_inputs(SHAPES[0], torch.float32)
    with pytest.raises(ValueError, match=r"positions has shape \(15,\); expected \(16,\)"):
        apply_rope_triton(q, k, positions[:15], THETA)
    with pytest.raises(TypeError, match="positions must be an int32 or int64 tensor"):
        apply_rope_triton(q, k, positions.float(), THETA)
    with pytest.raises(TypeError, match="k has dtype torch.float16 but q has torch.float32"):
        apply_rope_triton(q, k.half(), positions, THETA)
    with pytest.raises(ValueError, match="does not match q"):
        apply_rope_triton(q, k[:, :, :16], positions, THETA)
    with pytest.raises(ValueError, match="head_dim must be even"):
        apply_rope_triton(q[..., :31], k[..., :31], positions, THETA)
    with pytest.raises(ValueError, match=r"must be \[tokens, heads, head_dim\]"):
        apply_rope_triton(q[0], k[0], positions, THETA)
    with pytest.raises(ValueError, match="theta must be a positive number"):
        apply_rope_triton(q, k, positions, 0.0)
