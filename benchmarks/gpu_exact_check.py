"""Bitwise checks of the exact mode that only a GPU can answer (issue #14), in one short run:

1. linear: does every M tile give the same bits as the 128-row tile for the same rows, on this device? Tiles
   that compile to another tensor-core instruction (16/32 rows on sm_90: mma.sync instead of wgmma) are kept
   out of kernels.ops.linear.block_m_choices until this says they match.
2. paged attention, exact mode: decode rows (in exact_decode_block_m's smaller tile: 64 rows on sm_90) and a
   prefill chunk equal the training attention's rows bit for bit (bf16, GQA 7:1, head_dim 64 and 128, contexts
   on and off the tiles' multiples).
3. paged attention, fast mode: a decode row's bits do not depend on the batch (split-KV pieces by length).
4. the sampler's log-probs: the fused token_logprobs of any subset of rows equals the batch's (exact mode's
   report); fast mode's one pass from head_logits' stored z vs the fused op (reported: on an H200 it differs in
   the last bits); the Philox row uniforms kernel equals its PyTorch path.

    python benchmarks/gpu_exact_check.py            # on a CUDA device; writes benchmarks/results/gpu_exact_check.json
    TRITON_INTERPRET=1 python benchmarks/gpu_exact_check.py --small    # smoke run on the CPU (tiny shapes)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from protege.kernels.ops import linear
from protege.kernels.ops.attention import varlen_attention_triton
from protege.kernels.ops.paged_attention import paged_attention_triton


# Contexts on and off the attention tiles' multiples; heads of Qwen2.5-0.5B (head_dim 64) and -7B (128), GQA 7:1.
PAGED_LENGTHS = [1, 17, 300, 1030, 2000, 4097, 12288]
PAGED_HEADS = [(14, 2, 64), (28, 4, 128)]


def linear_tiles(device, dtype, m, n, k):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(m, k, generator=g).to(device, dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(device, dtype)
    b = torch.randn(n, generator=g).to(device, dtype)
    outs = {bm: linear._matmul(x, x.stride(), w, (w.stride(1), w.stride(0)), m, n, k, b, dtype, block_m=bm)
            for bm in linear.BLOCK_MS}
    # Every tile against the 128-row one, and rows 0 and m-1 alone (a 1-row launch, top of its tile).
    same = {bm: bool(torch.equal(y, outs[128])) for bm, y in outs.items()}
    alone = {bm: all(torch.equal(linear._matmul(x[r:r + 1], x.stride(), w, (w.stride(1), w.stride(0)), 1, n, k, b,
                                                dtype, block_m=bm), outs[128][r:r + 1]) for r in (0, m - 1))
             for bm in linear.BLOCK_MS}
    return dict(shape=[m, n, k], same_as_128=same, row_alone_same_as_128=alone)


def paged_case(device, dtype, lengths, hq, hkv, d, page=16, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    blocks = [-(-n // page) for n in lengths]
    order = torch.randperm(sum(blocks) + 1, generator=g).tolist()
    tables, slots, at = [], [], 0
    for n, nb in zip(lengths, blocks):
        t = order[at:at + nb]
        at += nb
        tables.append(t + [0] * (max(blocks) - nb))
        slots += [t[p // page] * page + p % page for p in range(n)]
    q = torch.randn(sum(lengths), hq, d, generator=g).to(device, dtype)
    k = torch.randn(sum(lengths), hkv, d, generator=g).to(device, dtype)
    v = torch.randn(sum(lengths), hkv, d, generator=g).to(device, dtype)
    k_cache = torch.zeros(len(order), page, hkv, d, device=device, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    k_cache.view(-1, hkv, d)[torch.tensor(slots, device=device)] = k
    v_cache.view(-1, hkv, d)[torch.tensor(slots, device=device)] = v
    return q, k, v, k_cache, v_cache, torch.tensor(tables, dtype=torch.int32, device=device)


def attend(q_rows, k_cache, v_cache, tables, contexts, match_training, chunks=None):
    """Paged attention of q_rows: each sequence's last chunks[i] tokens (default 1: decode)."""
    device = q_rows.device
    chunks = chunks or [1] * len(contexts)
    cu = torch.tensor([0] + chunks, device=device).cumsum(0).to(torch.int32)
    return paged_attention_triton(q_rows, k_cache, v_cache, tables, cu,
                                  torch.tensor(contexts, dtype=torch.int32, device=device), max(chunks),
                                  match_training=match_training)


def paged_checks(device, dtype, lengths, heads=(14, 2, 128), chunk=64):
    """Exact mode's paged rows vs the training attention's, per sequence: decode (the last token) and a
    prefill chunk (its last `chunk` tokens); fast decode rows alone vs in the batch. Lengths off the tiles'
    multiples matter: the training kernel's unmasked and masked key blocks must round alike (an H200 showed
    a 300-token context differ while 1030 and 4000 agreed)."""
    q, k, v, k_cache, v_cache, tables = paged_case(device, dtype, lengths, *heads)
    bounds = torch.tensor([0] + lengths).cumsum(0).tolist()
    train = varlen_attention_triton(q, k, v, torch.tensor(bounds, dtype=torch.int32, device=device))
    last = torch.tensor([b - 1 for b in bounds[1:]], device=device)
    exact = attend(q[last], k_cache, v_cache, tables, lengths, True)
    decode_equal = [bool(torch.equal(exact[i], train[last[i]])) for i in range(len(lengths))]
    chunks = [min(chunk, n) for n in lengths]
    rows = torch.tensor([r for b, c in zip(bounds[1:], chunks) for r in range(b - c, b)], device=device)
    got = attend(q[rows], k_cache, v_cache, tables, lengths, True, chunks)
    starts = [0] + torch.tensor(chunks).cumsum(0).tolist()
    chunk_equal = [bool(torch.equal(got[a:b], train[rows[a:b]])) for a, b in zip(starts[:-1], starts[1:])]
    fast = attend(q[last], k_cache, v_cache, tables, lengths, False)
    alone = [bool(torch.equal(attend(q[last[i:i + 1]], k_cache, v_cache, tables[i:i + 1], lengths[i:i + 1], False)[0],
                              fast[i])) for i in range(len(lengths))]
    err = (fast.float() - exact.float()).abs().max().item()
    return dict(lengths=lengths, heads=list(heads), exact_decode_equals_training=decode_equal,
                exact_chunk_equals_training=chunk_equal, fast_row_alone_equals_batch=alone,
                fast_vs_exact_max_abs_diff=err)


def sampler_head_checks(device, dtype, t, v, h, temperature=0.7):
    """Exact mode reports the fused token_logprobs of the sampled rows: any subset of rows gives the batch's
    bits. Fast mode's one pass (log p from head_logits' stored z) is reported, not required: on an H200 its
    sums run in another order than the fused op's (different register layouts), so its bits differ."""
    from protege.kernels import dispatch as kernels
    from protege.kernels import reference
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(t, h, generator=g).to(device, dtype)
    weight = (torch.randn(v, h, generator=g) * 2 / h ** 0.5).to(device, dtype)
    targets = torch.randint(0, v, (t,), generator=g).to(device)
    want = kernels.token_logprobs(hidden, weight, targets, temperature, check_ids=False)
    subsets = [(0, 1), (t - 1, t), (1, max(2, t // 3)), (t // 2, t)]
    rows_equal = all(torch.equal(kernels.token_logprobs(hidden[a:b], weight, targets[a:b], temperature,
                                                        check_ids=False), want[a:b]) for a, b in subsets)
    got = kernels.logprobs_from_logits(kernels.head_logits(hidden, weight, temperature), targets)
    seeds = torch.randint(0, 2 ** 62, (1000,), generator=g)
    counters = torch.randint(0, 2 ** 40, (1000,), generator=g)
    philox_same = torch.equal(kernels.philox_uniforms(seeds.to(device), counters.to(device)).cpu(),
                              reference.philox_uniforms(seeds, counters))
    return dict(shape=[t, v, h], fused_rows_equal_batch=bool(rows_equal),
                from_logits_equals_fused=bool(torch.equal(got, want)),
                from_logits_max_abs_diff=(got - want).abs().max().item(), philox_equals_reference=philox_same)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU interpreter smoke run)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.small:
        dtype, lin, lengths, heads = torch.float32, (40, 160, 80), [1, 17, 100], [(4, 2, 32)]
    else:
        dtype, lin, lengths, heads = torch.bfloat16, (300, 512, 3584), PAGED_LENGTHS, PAGED_HEADS
    report = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
                  capability=list(torch.cuda.get_device_capability()) if device == "cuda" else None,
                  dtype=str(dtype), allowed_block_m=None, linear=linear_tiles(device, dtype, *lin),
                  paged=[paged_checks(device, dtype, lengths, h) for h in heads],
                  sampler_head=sampler_head_checks(device, dtype, *((5, 300, 64) if args.small else (256, 152064, 3584))))
    if device == "cuda":
        report["allowed_block_m"] = list(linear._device_tiles(torch.device("cuda", torch.cuda.current_device()),
                                                              dtype)[0])
    print(json.dumps(report, indent=1))
    if not args.small:
        out = Path(__file__).resolve().parent / "results" / "gpu_exact_check.json"
        out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
