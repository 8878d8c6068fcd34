"""The whole model on the Triton path (interpreter, fp32) against its PyTorch path, and exact mode's
packing invariance: a sequence's logits do not depend on what else is in the pack."""
import pytest
import torch

from protege.engine.config import ModelConfig
from protege.engine.model import Qwen2ForCausalLM

LENGTHS = [7, 1, 19, 10]


def tiny_model(tied: bool, exact: bool) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                         rms_norm_eps=1e-6, rope_theta=1e4, tie_word_embeddings=tied)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
    model.exact = exact
    return model


def packed(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (sum(lengths),), generator=g)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return ids, cu


def logits_and_grads(model, ids, cu, backend, monkeypatch):
    monkeypatch.setenv("PROTEGE_KERNELS", backend)
    model.zero_grad(set_to_none=True)
    logits = model(ids, cu_seqlens=cu)
    weights = torch.linspace(-1, 1, logits.numel()).reshape(logits.shape)
    (logits * weights).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tied, exact", [(True, False), (False, True)], ids=["tied-fast", "untied-exact"])
def test_triton_path_matches_torch_path(tied, exact, monkeypatch):
    model = tiny_model(tied, exact)
    ids, cu = packed(LENGTHS)
    ref_logits, ref_grads = logits_and_grads(model, ids, cu, "torch", monkeypatch)
    tri_logits, tri_grads = logits_and_grads(model, ids, cu, "triton", monkeypatch)
    assert (tri_logits - ref_logits).abs().max().item() <= 1e-4
    assert ref_grads.keys() == tri_grads.keys()
    for name, g in ref_grads.items():
        err = (tri_grads[name] - g).abs().max().item()
        assert err <= 1e-4 * max(1.0, g.abs().max().item()), (name, err)


def test_exact_mode_logits_do_not_depend_on_the_pack(monkeypatch):
    monkeypatch.setenv("PROTEGE_KERNELS", "triton")
    model = tiny_model(tied=False, exact=True)
    ids, cu = packed(LENGTHS)
    with torch.no_grad():
        together = model(ids, cu_seqlens=cu)
        bounds = cu.tolist()
        for a, b in zip(bounds[:-1], bounds[1:]):
            alone = model(ids[a:b], cu_seqlens=torch.tensor([0, b - a], dtype=torch.int32))
            assert torch.equal(alone, together[a:b]), f"sequence [{a}:{b}] differs when packed"
        # And in another order, with another neighbour.
        order = [2, 0]
        parts = [ids[bounds[i]:bounds[i + 1]] for i in order]
        lens = [len(p) for p in parts]
        shuffled = model(torch.cat(parts), cu_seqlens=torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32))
        assert torch.equal(shuffled[:lens[0]], together[bounds[2]:bounds[3]])
