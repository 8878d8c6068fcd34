"""Paged KV write and paged attention (decode, prefill after a cached prefix): Triton vs an fp64 oracle, and
the invariances the sampler relies on (batch composition, chunking, agreement with the training kernel)."""
import pytest
import torch

from protege.kernels import reference
from protege.kernels.ops.attention import varlen_attention_triton
from protege.kernels.ops.paged_attention import SPLITS, decode_plan, paged_attention_triton, split_len, write_kv_cache_triton
from protege.kernels.precision import assert_close_to_fp64


def make_case(lengths, query_lens, hq, hkv, d, block_size, dtype, seed=0):
    """Sequences of `lengths` keys scattered over a shuffled block pool; the last query_lens[b] tokens of each
    are the new ones. Returns the dense per-sequence q/k/v too."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in lengths]
    num_blocks = sum(blocks_per_seq) + 3
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables, pos = [], 0
    for nb in blocks_per_seq:
        tables.append(order[pos:pos + nb])
        pos += nb
    width = max(blocks_per_seq)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    k_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(dtype)  # garbage in unused slots
    v_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(dtype)
    qs, ks, vs, slots = [], [], [], []
    for n, t in zip(lengths, tables):
        qs.append(torch.randn(n, hq, d, generator=g).to(dtype))
        ks.append(torch.randn(n, hkv, d, generator=g).to(dtype))
        vs.append(torch.randn(n, hkv, d, generator=g).to(dtype))
        slots.append(torch.tensor([t[p // block_size] * block_size + p % block_size for p in range(n)]))
    return dict(tables=block_tables, k_cache=k_cache, v_cache=v_cache, q=qs, k=ks, v=vs, slots=slots,
                lengths=lengths, query_lens=query_lens)


def fill_cache(case, write):
    """Write every sequence's keys/values into the cache with `write`."""
    write(torch.cat(case["k"]), torch.cat(case["v"]), case["k_cache"], case["v_cache"], torch.cat(case["slots"]))


def attend(case, fn):
    q = torch.cat([q[n - m:] for q, n, m in zip(case["q"], case["lengths"], case["query_lens"])])
    cu = torch.tensor([0] + torch.tensor(case["query_lens"]).cumsum(0).tolist(), dtype=torch.int32)
    ctx = torch.tensor(case["lengths"], dtype=torch.int32)
    return fn(q, case["k_cache"], case["v_cache"], case["tables"], cu, ctx, max(case["query_lens"]))


def dense_fp64(case):
    """Oracle: causal attention of each sequence's new queries over all its keys, in fp64, no paging."""
    outs = []
    for q, k, v, n, m in zip(case["q"], case["k"], case["v"], case["lengths"], case["query_lens"]):
        group = q.shape[1] // k.shape[1]
        qd, kd, vd = q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
        s = torch.einsum("qhd,khd->hqk", qd[n - m:], kd) * q.shape[-1] ** -0.5
        visible = torch.arange(n - m, n)[:, None] >= torch.arange(n)[None, :]
        p = s.masked_fill(~visible, float("-inf")).softmax(-1)
        outs.append(torch.einsum("hqk,khd->qhd", p, vd))
    return torch.cat(outs)


@pytest.mark.parametrize("lengths,query_lens,hq,hkv,d,block_size,match_training", [
    ([37, 16, 5], [1, 1, 1], 4, 2, 16, 16, True),     # decode, nice
    ([37, 16, 5], [1, 1, 1], 4, 2, 16, 16, False),    # decode with its own (small) query tiles
    ([45, 3, 29], [13, 3, 1], 6, 2, 24, 8, True),     # prefill after a prefix, mixed with decode; odd dims
    ([45, 3, 70], [13, 3, 1], 6, 2, 24, 8, False),    # the same in fast mode: split decode rows + prefill tiles
])
def test_paged_attention_matches_fp64_oracle(lengths, query_lens, hq, hkv, d, block_size, match_training):
    case = make_case(lengths, query_lens, hq, hkv, d, block_size, torch.float32)
    fill_cache(case, write_kv_cache_triton)
    expected = dense_fp64(case)
    got = attend(case, lambda *a: paged_attention_triton(*a, match_training=match_training))
    torch_err = (attend(case, reference.paged_attention).double() - expected).abs().max().item()
    err = (got.double() - expected).abs().max().item()
    assert err <= 2 * torch_err + 1e-6, (err, torch_err)


def test_write_kv_cache_skips_negative_slots_and_matches_reference():
    case = make_case([20, 9], [1, 1], 2, 2, 8, 4, torch.float32)
    k, v = torch.cat(case["k"]), torch.cat(case["v"])
    slots = torch.cat(case["slots"])
    slots[::3] = -1
    caches = [(case["k_cache"].clone(), case["v_cache"].clone()) for _ in range(2)]
    write_kv_cache_triton(k, v, *caches[0], slots)
    reference.write_kv_cache(k, v, *caches[1], slots)
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
    untouched = case["k_cache"].view(-1, 2, 8)[torch.cat(case["slots"])[::3]]
    assert torch.equal(caches[0][0].view(-1, 2, 8)[torch.cat(case["slots"])[::3]], untouched)


def test_rows_do_not_depend_on_batch_or_chunking():
    case = make_case([41, 30, 7], [9, 1, 7], 4, 2, 16, 8, torch.float32)
    fill_cache(case, write_kv_cache_triton)
    batch = attend(case, paged_attention_triton)
    alone = attend(dict(case, tables=case["tables"][:1], lengths=[41], query_lens=[9]), paged_attention_triton)
    assert torch.equal(batch[:9], alone)
    # The last of those rows as a decode step (its sequence cut at its position) gives the same bits.
    for cut in (33, 41):
        decode = attend(dict(case, tables=case["tables"][:1], lengths=[cut], query_lens=[1]), paged_attention_triton)
        assert torch.equal(decode[0], batch[cut - 33])


def test_agrees_bitwise_with_training_attention():
    """The sampler's attention for a token equals the trainer's varlen attention for it, bit for bit."""
    lengths = [40, 23]
    case = make_case(lengths, lengths, 4, 2, 16, 8, torch.float32)
    fill_cache(case, write_kv_cache_triton)
    cu = torch.tensor([0, 40, 63], dtype=torch.int32)
    train = varlen_attention_triton(torch.cat(case["q"]), torch.cat(case["k"]), torch.cat(case["v"]), cu)
    chunked = attend(dict(case, query_lens=[17, 23]), paged_attention_triton)
    assert torch.equal(chunked[:17], train[23:40]) and torch.equal(chunked[17:], train[40:])


def test_write_kv_cache_of_strided_views():
    # A last-dim-strided k (every other element) must land in the cache as its values, not its memory.
    torch.manual_seed(0)
    wide = torch.randn(5, 2, 16)
    k, v = wide[:, :, ::2], wide[:, :, 1::2]  # [5, 2, 8], stride(-1) == 2
    k_cache, v_cache = torch.zeros(4, 4, 2, 8), torch.zeros(4, 4, 2, 8)
    slots = torch.tensor([0, 1, 5, -1, 9])
    write_kv_cache_triton(k, v, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(16, 2, 8), v_cache.view(16, 2, 8)
    for i, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(flat_k[slot], k[i]) and torch.equal(flat_v[slot], v[i])


# --- GQA-packed decode, split-KV (fast mode) and the exact mode on odd shapes -------------------------------

def subset(case, idx):
    """The sequences idx of a case as a batch of their own (their block tables narrowed to what they use)."""
    pick = {key: [case[key][i] for i in idx] for key in ("q", "k", "v", "slots", "lengths", "query_lens")}
    width = max(-(-n // case["k_cache"].shape[1]) for n in pick["lengths"])
    return dict(case, tables=case["tables"][idx][:, :width].contiguous(), **pick)


def rows_of(case, i):
    """The output rows of sequence i of a case's batch."""
    start = sum(case["query_lens"][:i])
    return slice(start, start + case["query_lens"][i])


ODD_CONTEXTS = [1, 15, 16, 17, 1030]  # one key, around a 16-key block, and many split-KV pieces


@pytest.mark.parametrize("match_training", [True, False], ids=["exact", "fast"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hq,hkv,d", [(7, 1, 64), (14, 2, 128)])  # GQA 7:1
def test_decode_gqa_split_kv_vs_fp64(hq, hkv, d, dtype, match_training):
    case = make_case(ODD_CONTEXTS, [1] * len(ODD_CONTEXTS), hq, hkv, d, 16, dtype, seed=1)
    fill_cache(case, reference.write_kv_cache)  # (the Triton writer is tested above; it is slow interpreted)
    got = attend(case, lambda *a: paged_attention_triton(*a, match_training=match_training))
    assert got.dtype == dtype
    assert_close_to_fp64("paged decode", got, attend(case, reference.paged_attention), dense_fp64(case))


@pytest.mark.parametrize("match_training", [True, False], ids=["exact", "fast"])
def test_rows_are_bitwise_invariant_to_the_batch_composition(match_training):
    # Long split decode rows, short unsplit ones, a prefill chunk, piece boundaries (32 keys in the interpreter).
    lengths, query_lens = [1030, 17, 40, 1, 100, 33], [1, 1, 5, 1, 1, 1]
    case = make_case(lengths, query_lens, 7, 1, 64, 16, torch.float32, seed=2)
    fill_cache(case, reference.write_kv_cache)

    def run(c):
        return attend(c, lambda *a: paged_attention_triton(*a, match_training=match_training))

    full = run(case)
    for idx in ([0], [1, 3], [3, 0, 4], [2], [5, 2, 1]):  # alone, decode only (no split), reordered, ...
        part = subset(case, idx)
        got = run(part)
        for j, i in enumerate(idx):
            assert torch.equal(got[rows_of(part, j)], full[rows_of(case, i)]), f"sequence {i} in batch {idx}"


@pytest.mark.parametrize("hq,hkv,d,lengths", [(7, 1, 64, [1, 15, 16, 17, 150]), (14, 2, 128, [17, 16, 1, 70])])
def test_exact_mode_equals_training_attention_bitwise(hq, hkv, d, lengths):
    """Decode rows at several positions and a prefill chunk, GQA-packed, against the trainer's varlen attention
    of the whole sequences. (Rows sit at other tile positions than in training: under the interpreter this needs
    a tl.dot whose rows do not depend on their place in the tile; see tests/conftest.py.)"""
    case = make_case(lengths, [1] * len(lengths), hq, hkv, d, 16, torch.float32, seed=3)
    fill_cache(case, reference.write_kv_cache)
    bounds = torch.tensor([0] + lengths).cumsum(0)
    train = varlen_attention_triton(torch.cat(case["q"]), torch.cat(case["k"]), torch.cat(case["v"]),
                                    bounds.to(torch.int32))
    # Decode at the last position of every sequence, then at earlier ones (the sequence cut there).
    decode = attend(case, paged_attention_triton)
    for i, n in enumerate(lengths):
        assert torch.equal(decode[i], train[bounds[i] + n - 1]), f"decode of sequence {i} at {n - 1}"
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    for cut in (1, 16, 33, lengths[longest] - 20):
        one = subset(case, [longest])
        got = attend(dict(one, lengths=[cut]), paged_attention_triton)
        assert torch.equal(got[0], train[bounds[longest] + cut - 1]), f"decode at position {cut - 1}"
    # A chunk of 13 tokens after a cached prefix.
    n = lengths[longest]
    chunk = attend(dict(subset(case, [longest]), query_lens=[13]), paged_attention_triton)
    assert torch.equal(chunk, train[bounds[longest] + n - 13:bounds[longest] + n])


def test_split_kv_pieces_depend_on_the_context_length_only():
    for on_gpu, block_n in ((True, 64), (False, 16)):
        split_min, max_splits = SPLITS[on_gpu]
        for ctx in range(1, 20000, 7):
            length = split_len(ctx, block_n, split_min, max_splits)
            assert length % block_n == 0 and length >= split_min and -(-ctx // length) <= max_splits
    assert [-(-n // split_len(n, 64, *SPLITS[True])) for n in (1, 512, 513, 4096, 12288, 32768)] == [1, 1, 2, 8, 16, 16]
    # Exact mode keeps the trainer's tiles and never splits; fast decode packs the 7 heads of a group in 16 rows.
    exact, fast = (decode_plan(True, torch.bfloat16, 128, 7, m) for m in (True, False))
    assert exact["decode"] == exact["prefill"] and exact["decode"]["split"] is None   # unknown GPU
    # Exact decode rows: the fewest rows with the training tile's instruction (wgmma: 64 rows, one warpgroup).
    for capability, rows, warps in (((9, 0), 64, 4), ((8, 0), 16, 8), ((10, 0), 128, 8)):
        plan = decode_plan(True, torch.bfloat16, 128, 7, True, capability)
        assert (plan["decode"]["block_m"], plan["decode"]["launch"]["num_warps"]) == (rows, warps)
        assert plan["prefill"] == exact["prefill"] and plan["decode"]["split"] is None
    assert decode_plan(False, torch.float32, 64, 7, True)["decode"]["block_m"] == 16   # interpreter: < its 32
    assert (fast["decode"]["block_m"], fast["decode"]["split"], fast["prefill"]["split"]) == (16, SPLITS[True], None)
