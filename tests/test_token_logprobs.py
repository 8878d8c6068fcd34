"""token_logprobs (fused lm_head + log-softmax): the Triton kernels (interpreter on the CPU) and the chunked
PyTorch path against the fp64 reference that materialises the logits; forward (log-prob, entropy) and
backward (hidden, weight) with random upstream gradients; batch invariance; bad inputs."""
import importlib

import pytest
import torch

from protege.kernels import reference

tlp = importlib.import_module("protege.kernels.ops.token_logprobs")

IMPLS = {"triton": tlp.token_logprobs_triton, "chunked": reference.token_logprobs_chunked}
# (T, H, V, temperature): a nice shape, and an odd one (nothing a multiple of a block) at temperature != 1.
SHAPES = {"nice": (64, 64, 512, 1.0), "odd": (37, 80, 1000, 0.7)}


def make_inputs(T, H, V, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * (2.0 / H ** 0.5)  # logits of std ~2: a peaked softmax
    targets = torch.randint(0, V, (T,), generator=gen)
    grad_logp = torch.randn(T, generator=gen)
    grad_entropy = torch.randn(T, generator=gen)
    return hidden, weight, targets, grad_logp, grad_entropy


def run(fn, hidden, weight, targets, temperature, grad_logp, grad_entropy, dtype):
    """(logp, entropy, d hidden, d weight) as fp64 for loss = sum(grad_logp * logp + grad_entropy * entropy)."""
    h = hidden.to(dtype).clone().requires_grad_()
    w = weight.to(dtype).clone().requires_grad_()
    logp, entropy = fn(h, w, targets, temperature, True)
    (logp * grad_logp + entropy * grad_entropy).sum().backward()
    return [t.detach().double() for t in (logp, entropy, h.grad, w.grad)]


def rel_err(x, ref):
    return ((x - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture
def small_chunks(monkeypatch):
    """Row tiles / blocks of 16 rows and backward chunks of 16 / 32 rows, so T=37 spans several of each (the
    multi-chunk path accumulates the weight gradient)."""
    monkeypatch.setattr(tlp, "BLOCK_T", 16)
    monkeypatch.setattr(tlp, "TRITON_CHUNK_ROWS", 16)
    monkeypatch.setattr(reference, "ROW_BLOCK", 16)
    monkeypatch.setattr(reference, "CHUNK_ROWS", 32)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_fp32_matches_fp64_reference(impl, shape, small_chunks):
    T, H, V, temperature = SHAPES[shape]
    hidden, weight, targets, g, ge = make_inputs(T, H, V)
    got = run(IMPLS[impl], hidden, weight, targets, temperature, g, ge, torch.float32)
    want = run(reference.token_logprobs, hidden, weight, targets, temperature, g, ge, torch.float64)
    for name, x, ref in zip(("logp", "entropy", "d hidden", "d weight"), got, want):
        assert rel_err(x, ref) <= 1e-4, f"{name}: relative error {rel_err(x, ref):.2e}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_fp16_within_twice_pytorch_fp16_error(impl, shape, small_chunks):
    T, H, V, temperature = SHAPES[shape]
    hidden, weight, targets, g, ge = make_inputs(T, H, V, seed=1)
    got = run(IMPLS[impl], hidden, weight, targets, temperature, g, ge, torch.float16)
    torch_fp16 = run(reference.token_logprobs, hidden, weight, targets, temperature, g, ge, torch.float16)
    # The fp64 oracle sees the same fp16-rounded inputs.
    want = run(reference.token_logprobs, hidden.half(), weight.half(), targets, temperature, g, ge,
               torch.float64)
    for name, x, base, ref in zip(("logp", "entropy", "d hidden", "d weight"), got, torch_fp16, want):
        assert rel_err(x, ref) <= 2 * rel_err(base, ref), \
            f"{name}: error {rel_err(x, ref):.2e} > 2 x PyTorch fp16 error {rel_err(base, ref):.2e}"


@pytest.mark.parametrize("impl", IMPLS)
def test_sft_loss_gradient_without_entropy(impl):
    """The SFT use: loss = -sum(mask * logp) / n_trainable; logp alone, no entropy output."""
    T, H, V, temperature = SHAPES["odd"]
    hidden, weight, targets, _, _ = make_inputs(T, H, V, seed=2)
    mask = (torch.arange(T) % 3 != 0).float()
    grads = []
    for fn, dtype in ((IMPLS[impl], torch.float32), (reference.token_logprobs, torch.float64)):
        h = hidden.to(dtype).clone().requires_grad_()
        w = weight.to(dtype).clone().requires_grad_()
        logp = fn(h, w, targets, temperature)
        assert logp.shape == (T,) and logp.dtype == torch.promote_types(dtype, torch.float32)
        (-(mask * logp).sum() / mask.sum()).backward()
        grads.append((h.grad.double(), w.grad.double()))
    for x, ref in zip(*grads):
        assert rel_err(x, ref) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("impl", IMPLS)
def test_row_result_independent_of_batch(impl, dtype, small_chunks):
    """The sampler scores rows alone or in other batches: a row's log-prob and entropy must be bit-identical."""
    T, H, V, temperature = SHAPES["odd"]
    hidden, weight, targets, _, _ = make_inputs(T, H, V, seed=3)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    fn = IMPLS[impl]
    logp, entropy = fn(hidden, weight, targets, temperature, True)
    assert torch.equal(fn(hidden, weight, targets, temperature), logp)
    for lo, hi in ((0, 1), (17, 18), (36, 37), (5, 30)):
        part_logp, part_entropy = fn(hidden[lo:hi], weight, targets[lo:hi], temperature, True)
        assert torch.equal(part_logp, logp[lo:hi]), (lo, hi)
        assert torch.equal(part_entropy, entropy[lo:hi]), (lo, hi)


@pytest.mark.parametrize("impl", IMPLS)
def test_backward_is_deterministic(impl, small_chunks):
    T, H, V, temperature = SHAPES["odd"]
    hidden, weight, targets, g, ge = make_inputs(T, H, V, seed=4)
    first = run(IMPLS[impl], hidden, weight, targets, temperature, g, ge, torch.float32)
    second = run(IMPLS[impl], hidden, weight, targets, temperature, g, ge, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter's max over a NaN row
@pytest.mark.parametrize("impl", IMPLS)
def test_nan_propagates_like_reference(impl):
    T, H, V, temperature = SHAPES["odd"]
    hidden, weight, targets, _, _ = make_inputs(T, H, V, seed=5)
    hidden[3, 7] = float("nan")  # poisons row 3 only
    for h, w in ((hidden, weight), (hidden[:3], weight.index_fill(0, torch.tensor([11]), float("nan")))):
        t = targets[: h.shape[0]]
        logp, entropy = IMPLS[impl](h, w, t, temperature, True)
        ref_logp, ref_entropy = reference.token_logprobs(h.double(), w.double(), t, temperature, True)
        assert ref_logp.isnan().any()
        assert torch.equal(logp.isnan(), ref_logp.isnan())
        assert torch.equal(entropy.isnan(), ref_entropy.isnan())


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch(impl):
    h = torch.zeros(0, 8, requires_grad=True)
    w = torch.randn(16, 8, requires_grad=True)
    logp = IMPLS[impl](h, w, torch.zeros(0, dtype=torch.long))
    logp.sum().backward()
    assert logp.shape == (0,) and torch.equal(w.grad, torch.zeros_like(w))


BAD_INPUTS = {
    "hidden must be \\[T, H\\]": lambda h, w, t: (h[None], w, t, 1.0),
    "weight must be \\[V, H\\]": lambda h, w, t: (h, w[0], t, 1.0),
    "hidden size differs": lambda h, w, t: (h, w[:, :-1], t, 1.0),
    "targets must be \\[T\\] = \\[6\\]": lambda h, w, t: (h, w, t[:-1], 1.0),
    "targets must be int32 or int64": lambda h, w, t: (h, w, t.float(), 1.0),
    "dtype mismatch": lambda h, w, t: (h, w.half(), t, 1.0),
    "float64 unsupported": lambda h, w, t: (h.double(), w.double(), t, 1.0),
    "device mismatch": lambda h, w, t: (h, w.to("meta"), t, 1.0),
    "target id 20 out of range \\[0, 20\\)": lambda h, w, t: (h, w, t.index_fill(0, t.new_tensor([2]), 20), 1.0),
    "target id -1 out of range": lambda h, w, t: (h, w, t.index_fill(0, t.new_tensor([0]), -1), 1.0),
    "temperature must be a finite number > 0, got 0.0": lambda h, w, t: (h, w, t, 0.0),
    "temperature must be a finite number > 0, got nan": lambda h, w, t: (h, w, t, float("nan")),
}


@pytest.mark.parametrize("message", BAD_INPUTS)
@pytest.mark.parametrize("impl", IMPLS)
def test_bad_input_is_named(impl, message):
    hidden, weight, targets = torch.randn(6, 8), torch.randn(20, 8), torch.randint(0, 20, (6,))
    with pytest.raises(ValueError, match=f"token_logprobs: .*{message}"):
        IMPLS[impl](*BAD_INPUTS[message](hidden, weight, targets))


def test_triton_path_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    from protege.kernels import _validate
    monkeypatch.setattr(_validate, "INTERPRETING", False)
    with pytest.raises(ValueError, match="token_logprobs: hidden is on cpu; the Triton kernels need a CUDA tensor"):
        tlp.token_logprobs_triton(torch.randn(6, 8), torch.randn(20, 8), torch.randint(0, 20, (6,)))


@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_head_logits_are_the_logits_token_logprobs_uses(impl):
    """The sampler draws from softmax(head_logits) and reports token_logprobs: one distribution."""
    from protege.kernels.ops.token_logprobs import head_logits_triton
    head = {"triton": head_logits_triton, "chunked": reference.head_logits_chunked}[impl]
    T, H, V, temperature = SHAPES["odd"]
    hidden, weight, targets, _, _ = make_inputs(T, H, V)
    z = head(hidden, weight, temperature)
    assert z.shape == (T, V) and z.dtype == torch.float32
    exact = (hidden.double() @ weight.double().t()) / temperature
    assert (z.double() - exact).abs().max() <= 1e-4 * exact.abs().max()
    logp = IMPLS[impl](hidden, weight, targets, temperature)
    from_z = torch.log_softmax(z.double(), -1).gather(1, targets[:, None]).squeeze(1)
    assert (logp.double() - from_z).abs().max() <= 2e-6


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_logprobs_from_logits_are_token_logprobs_bitwise(impl, shape, small_chunks):
    """The sampler's one pass over the LM head: log p from head_logits' z equals the fused op bit for bit."""
    from protege.kernels.ops.token_logprobs import head_logits_triton, logprobs_from_logits_triton
    head, from_z = {"triton": (head_logits_triton, logprobs_from_logits_triton),
                    "chunked": (reference.head_logits_chunked, reference.logprobs_from_logits_chunked)}[impl]
    T, H, V, temperature = SHAPES[shape]
    hidden, weight, targets, _, _ = make_inputs(T, H, V, seed=3)
    for dtype in (torch.float32, torch.float16):
        h, w = hidden.to(dtype), weight.to(dtype)
        want = IMPLS[impl](h, w, targets, temperature)
        assert torch.equal(from_z(head(h, w, temperature), targets), want)
        assert torch.equal(from_z(head(h[5:6], w, temperature), targets[5:6]), want[5:6])  # alone: same bits
