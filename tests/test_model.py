"""engine/model.py against Hugging Face's Qwen2ForCausalLM (fp32, CPU, tiny random configs)."""
import os

import pytest
import torch
import torch.nn.functional as F
import transformers

from protege.engine.config import ModelConfig
from protege.engine.model import Qwen2ForCausalLM, _positions
from protege.engine.training.parallelize import apply_activation_checkpointing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = [5, 1, 11, 4]

# (hidden, heads, kv heads, head_dim or None, intermediate, vocab, tied, rope_theta, exact)
CONFIGS = {
    "tied-gqa1-hidden84-head12": (84, 7, 7, None, 50, 101, True, 1e4, False),
    "untied-gqa2-exact": (64, 4, 2, None, 40, 96, False, 1e6, True),
    "tied-gqa7-explicit-head10": (48, 7, 1, 10, 37, 77, True, 1e6, False),
    "untied-gqa2-explicit-head6-hidden45": (45, 6, 3, 6, 31, 64, False, 5e5, False),
}


def random_hf_model(hidden, heads, kv_heads, head_dim, intermediate, vocab, tied, theta, seed=0):
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
        rms_norm_eps=1e-5, tie_word_embeddings=tied, rope_parameters={"rope_theta": theta, "rope_type": "default"},
        attn_implementation="eager", **({"head_dim": head_dim} if head_dim else {}))
    model = transformers.Qwen2ForCausalLM(config).float().eval()
    with torch.no_grad():  # HF initialises biases to 0 and norms to 1: randomise everything
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
    return model


def packed_batch(vocab, lengths=LENGTHS, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (sum(lengths),), generator=g)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return ids, cu


def hf_per_sequence(hf, ids, cu):
    """HF logits of each sequence run alone, concatenated."""
    bounds = cu.tolist()
    return torch.cat([hf(input_ids=ids[a:b][None]).logits[0] for a, b in zip(bounds[:-1], bounds[1:]) if b > a])


@pytest.fixture(params=list(CONFIGS), ids=list(CONFIGS))
def pair(request, tmp_path):
    """(HF model, our model loaded from the HF model's save)."""
    *shape, exact = CONFIGS[request.param]
    hf = random_hf_model(*shape)
    hf.save_pretrained(tmp_path)
    ours = Qwen2ForCausalLM.from_pretrained(tmp_path)
    ours.exact = exact
    return hf, ours


def test_logits_match_hf_per_sequence(pair):
    hf, ours = pair
    ids, cu = packed_batch(ours.config.vocab_size)
    with torch.no_grad():
        expected = hf_per_sequence(hf, ids, cu)
        got = ours(ids, cu_seqlens=cu)
    assert got.shape == (ids.numel(), ours.config.vocab_size)
    assert (got - expected).abs().max() <= 1e-4
    assert expected.abs().max() > 1.0  # the comparison is not between near-zero numbers


def test_gradients_match_hf(pair):
    hf, ours = pair
    ids, cu = packed_batch(ours.config.vocab_size)
    targets = torch.roll(ids, -1)
    F.cross_entropy(ours(ids, cu_seqlens=cu), targets, reduction="sum").backward()
    # HF runs each sequence alone: the summed loss over the concatenation is the sum of per-sequence losses.
    F.cross_entropy(hf_per_sequence(hf, ids, cu), targets, reduction="sum").backward()
    ours_grads = {n: p.grad for n, p in ours.named_parameters()}
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    assert ours_grads.keys() == hf_grads.keys()
    for name, g in ours_grads.items():
        scale = max(1.0, hf_grads[name].abs().max().item())
        assert (g - hf_grads[name]).abs().max() <= 1e-4 * scale, name


def test_triton_kernels_match_hf(tmp_path, monkeypatch):
    """The same parity with every op on its Triton kernel (the CPU runs them in the Triton interpreter)."""
    hf = random_hf_model(48, 4, 2, None, 40, 64, True, 1e6)
    hf.save_pretrained(tmp_path)
    ours = Qwen2ForCausalLM.from_pretrained(tmp_path)
    ours.exact = True
    ids, cu = packed_batch(64, lengths=[5, 1, 7])
    targets = torch.roll(ids, -1)
    monkeypatch.setenv("PROTEGE_KERNELS", "triton")
    logits = ours(ids, cu_seqlens=cu)
    F.cross_entropy(logits, targets, reduction="sum").backward()
    monkeypatch.delenv("PROTEGE_KERNELS")
    expected = hf_per_sequence(hf, ids, cu)
    assert (logits.detach() - expected).abs().max() <= 1e-4
    F.cross_entropy(expected, targets, reduction="sum").backward()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        scale = max(1.0, hf_params[name].grad.abs().max().item())
        assert (p.grad - hf_params[name].grad).abs().max() <= 1e-4 * scale, name


def test_state_dict_keys_are_hf_names(pair):
    hf, ours = pair
    hf_keys = set(hf.state_dict()) - ({"lm_head.weight"} if ours.config.tie_word_embeddings else set())
    assert set(ours.state_dict()) == hf_keys
    assert ours.lm_head_weight is (ours.model.embed_tokens.weight if ours.config.tie_word_embeddings
                                   else ours.lm_head.weight)


def small_model(tied=True, seed=0, **overrides):
    torch.manual_seed(seed)
    config = ModelConfig(**{**dict(vocab_size=40, hidden_size=32, intermediate_size=24, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                   tie_word_embeddings=tied), **overrides})
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model


def test_packing_is_invisible_and_empty_sequences_are_allowed():
    model = small_model()
    ids, cu = packed_batch(40, lengths=[3, 0, 7, 2])
    packed = model(ids, cu_seqlens=cu)
    for a, b in [(0, 3), (3, 10), (10, 12)]:
        alone = model(ids[a:b], cu_seqlens=torch.tensor([0, b - a], dtype=torch.int32))
        assert (packed[a:b] - alone).abs().max() <= 1e-5


def attention_per_span(spans):
    """Causal attention within each (start, end) span, written independently of the kernels package."""
    def attention(layer_idx, q, k, v):
        rep = q.shape[1] // k.shape[1]
        out = []
        for a, b in spans:
            qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))
            out.append(F.scaled_dot_product_attention(qs, ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0),
                                                      is_causal=True).transpose(0, 1))
        return torch.cat(out)
    return attention


def test_explicit_positions_and_attention_callable():
    model = small_model()
    ids, cu = packed_batch(40, lengths=[4, 6])
    default = model(ids, cu_seqlens=cu)
    positions = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 4, 5])
    calls = []
    per_span = attention_per_span([(0, 4), (4, 10)])

    def attention(layer_idx, q, k, v):
        calls.append((layer_idx, q.shape, k.shape, v.shape))
        return per_span(layer_idx, q, k, v)

    got = model(ids, positions=positions, attention=attention)
    assert (got - default).abs().max() <= 1e-5
    assert torch.equal(model(ids, cu_seqlens=cu, positions=positions), default)
    assert calls == [(i, (10, 4, 8), (10, 2, 8), (10, 2, 8)) for i in range(3)]
    stretched = model(ids, cu_seqlens=cu, positions=positions * 2)  # (a uniform shift would change nothing)
    assert (stretched - default).abs().max() > 1e-3  # positions are really used


def test_default_positions_restart_at_each_sequence():
    # (RoPE attention only sees relative positions, so the logits alone could not tell.)
    cu = torch.tensor([0, 3, 3, 7, 8], dtype=torch.int32)
    assert _positions(cu, 8).tolist() == [0, 1, 2, 0, 1, 2, 3, 0]


def test_return_hidden_is_the_input_of_the_head():
    for tied in (True, False):
        model = small_model(tied=tied)
        ids, cu = packed_batch(40, lengths=[5, 3])
        hidden = model(ids, cu_seqlens=cu, return_hidden=True)
        assert hidden.shape == (8, 32)
        assert (hidden @ model.lm_head_weight.t() - model(ids, cu_seqlens=cu)).abs().max() <= 1e-6


def test_activation_checkpointing_gives_identical_gradients():
    ids, cu = packed_batch(40, lengths=[6, 9])
    grads = []
    for checkpointed in (False, True):
        model = small_model(seed=3)
        keys = set(model.state_dict())
        if checkpointed:
            apply_activation_checkpointing(model)
            apply_activation_checkpointing(model)  # a second application is a no-op
        F.cross_entropy(model(ids, cu_seqlens=cu), torch.roll(ids, -1)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        assert set(model.state_dict()) == keys
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_activation_checkpointing_recomputes_each_layer_once():
    model = small_model()
    apply_activation_checkpointing(model)
    apply_activation_checkpointing(model)
    ids = packed_batch(40, lengths=[6, 9])[0]
    per_span = attention_per_span([(0, 6), (6, 15)])
    layers_run = []

    def attention(layer_idx, q, k, v):
        layers_run.append(layer_idx)
        return per_span(layer_idx, q, k, v)

    positions = torch.cat([torch.arange(6), torch.arange(9)])
    model(ids, positions=positions, attention=attention).sum().backward()
    assert layers_run == [0, 1, 2, 2, 1, 0]  # the forward, then each layer again during the backward


@pytest.mark.parametrize("ids, cu, message", [
    (torch.tensor([1, 2, 3], dtype=torch.int32), [0, 3], "input_ids must be a 1-D torch.long"),
    (torch.tensor([[1, 2, 3]]), [0, 3], "input_ids must be a 1-D torch.long"),
    (torch.tensor([1, 2, 3]), torch.tensor([0, 3]), "cu_seqlens must be a 1-D torch.int32"),
    (torch.tensor([1, 2, 3]), [1, 3], "cu_seqlens must run from 0"),
    (torch.tensor([1, 2, 3]), [0, 2], "cu_seqlens must run from 0 to the number of tokens"),
    (torch.tensor([1, 2, 3]), [0], "cu_seqlens must run from 0"),
    (torch.tensor([1, 2, 3]), [0, 2, 1, 3], "non-decreasing"),
    (torch.arange(20) % 40, [0, 3, 20], "17 tokens is longer than max_position_embeddings=16"),
    (torch.tensor([1, 40, 3]), [0, 3], "input_ids must lie in \\[0, vocab_size=40\\)"),
    (torch.tensor([1, -1, 3]), [0, 3], "input_ids must lie in"),
    (torch.tensor([1, 2, 3]), None, "cu_seqlens is required"),
])
def test_bad_inputs_are_refused(ids, cu, message):
    model = small_model()
    if isinstance(cu, list):
        cu = torch.tensor(cu, dtype=torch.int32)
    with pytest.raises(ValueError, match=message):
        model(ids, cu_seqlens=cu)
