"""Work of one decode step of Qwen2.5-7B (28 layers, 28 query heads, 4 KV heads, head_dim 128, bf16), counted
from the kernels' tiling, not measured: the paged decode attention before (one program per query head and
sequence, issue #14) and after (GQA-packed tiles, split-KV in fast mode), and the CTAs of the exact-mode
projections before (128x128 tiles only) and after (M tile chosen by the row count).

Attention, per step (all layers):
- K/V loaded: bytes of the K/V rows the programs load (a program loads each valid key of the blocks it walks);
  the HBM minimum is every sequence's cache read once. Loads beyond it are re-reads (L2 or HBM).
- tensor-core FLOPs: 2 x (BLOCK_M x BLOCK_N x D) multiply-adds per key block a program walks (Q K^T and P V),
  whole tiles, as issued; useful: 4 x batch x Hq x context x D.
- split-KV partials: fp32 (D + 2) numbers per query head and piece, written then read by the merge.

    python benchmarks/decode_work.py     # writes benchmarks/results/decode_work.{json,md}; no GPU needed
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import triton

from protege.kernels.ops import linear, paged_attention

LAYERS, HQ, HKV, D, HIDDEN, INTER, VOCAB = 28, 28, 4, 128, 3584, 18944, 152064
BF16 = 2
SMS = {"sm_90 (H100/H200)": ((9, 0), 132), "sm_80 (A100)": ((8, 0), 108)}
CASES = [(64, 12288), (64, 4096), (1, 12288)]  # (batch, context): the case first


def attention_work(batch, ctx, block_m, block_n, programs_per_seq, q_heads_per_program, pieces):
    """Per step: programs, K/V bytes loaded, tensor-core FLOPs issued, partial bytes. Each of the
    programs_per_seq programs of a sequence walks its share of the ctx keys (pieces > 1: ctx / pieces each)."""
    length = ctx if pieces == 1 else paged_attention.split_len(ctx, block_n, *paged_attention.SPLITS[True])
    keys = [min(length, ctx - lo) for lo in range(0, ctx, length)]  # keys walked by each piece
    kv_programs = programs_per_seq // len(keys)  # programs per piece
    blocks = sum(triton.cdiv(n, block_n) for n in keys) * kv_programs
    return dict(programs=batch * programs_per_seq * LAYERS,
                kv_bytes=batch * kv_programs * ctx * D * 2 * BF16 * LAYERS,
                tc_flops=batch * blocks * 4 * block_m * block_n * D * LAYERS,
                partial_bytes=(batch * HQ * len(keys) * (D + 2) * 4 * 2 * LAYERS) if len(keys) > 1 else 0,
                pieces=len(keys), q_rows_per_tile=q_heads_per_program, block_m=block_m, block_n=block_n)


H100 = (9, 0)   # the exact decode tile depends on the architecture (exact_decode_block_m): sm_90's


def attention_rows(batch, ctx):
    group = HQ // HKV
    rows = []
    for mode, exact in (("exact", True), ("fast", False)):
        # Before: one program per (query head, sequence), one live row; exact used the training tile (128),
        # fast a 16-row tile; keys in the training's 64-key blocks, no split.
        train = paged_attention.decode_plan(True, torch.bfloat16, D, group, True)["decode"]
        before_m, block_n = (train["block_m"] if exact else 16), train["block_n"]
        rows.append(dict(mode=mode, kernel="before", **attention_work(batch, ctx, before_m, block_n, HQ, 1, 1)))
        t = paged_attention.decode_plan(True, torch.bfloat16, D, group, exact, H100)["decode"]
        pieces = 1
        if t["split"]:
            pieces = triton.cdiv(ctx, paged_attention.split_len(ctx, t["block_n"], *t["split"]))
        rows.append(dict(mode=mode, kernel="after", **attention_work(batch, ctx, t["block_m"], t["block_n"],
                                                                     HKV * pieces, group, pieces)))
    useful = 4 * batch * HQ * ctx * D * LAYERS
    hbm = batch * ctx * HKV * D * 2 * BF16 * LAYERS
    return rows, useful, hbm


def projection_rows(batch):
    shapes = {"q_proj": (HIDDEN, HIDDEN), "k_proj / v_proj": (512, HIDDEN), "o_proj": (HIDDEN, HIDDEN),
              "gate_proj / up_proj": (INTER, HIDDEN), "down_proj": (HIDDEN, INTER), "lm_head": (VOCAB, HIDDEN)}
    rows = []
    for name, (n, k) in shapes.items():
        row = dict(projection=name, n=n, k=k, before_ctas=triton.cdiv(batch, 128) * triton.cdiv(n, 128))
        for arch, (cap, sms) in SMS.items():
            bm = linear.pick_block_m(batch, n, linear.block_m_choices(cap, torch.bfloat16), sms)
            row[arch] = dict(block_m=bm, ctas=triton.cdiv(batch, bm) * triton.cdiv(n, linear.BLOCK_N), sms=sms,
                             tc_flops_share_useful=batch / (triton.cdiv(batch, bm) * bm))
        rows.append(row)
    return rows


def main():
    out = dict(model="Qwen2.5-7B", layers=LAYERS, q_heads=HQ, kv_heads=HKV, head_dim=D, dtype="bf16",
               splits=dict(zip(("split_min", "max_splits"), paged_attention.SPLITS[True])), attention=[],
               projections_batch=64, projections=projection_rows(64))
    md = ["# Decode step work, Qwen2.5-7B bf16 (counted from the kernels' tiling)", "",
          "`python benchmarks/decode_work.py` (no GPU: figures follow from the tile sizes in kernels/ops/"
          "paged_attention.py and kernels/ops/linear.py; GPU tiles, all 28 layers, one decode step).", "",
          "## Paged decode attention", "",
          "Before: one program per (query head, sequence), one live row per tile (exact: the training's 128-row "
          "tile; fast: 16 rows), whole context per program. After: one program per (KV head, sequence[, piece]) "
          "with the 7 query heads of the KV head in the tile's rows (exact mode: the fewest rows with the training "
          "tile's tensor-core instruction, 64 on sm_90 as here, 16 on sm_80); fast mode splits the context into pieces "
          f"(a function of its length: >= {paged_attention.SPLITS[True][0]} keys, <= "
          f"{paged_attention.SPLITS[True][1]} pieces).", "",
          "| batch x context | mode | kernel | tile (M x N) | live rows | pieces | programs / layer | K/V loaded (GB) "
          "| x HBM minimum | tensor-core TFLOP | x useful | split partials (GB) |",
          "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for batch, ctx in CASES:
        rows, useful, hbm = attention_rows(batch, ctx)
        out["attention"].append(dict(batch=batch, context=ctx, useful_flops=useful, hbm_min_kv_bytes=hbm, rows=rows))
        for r in rows:
            md.append(f"| {batch} x {ctx} | {r['mode']} | {r['kernel']} | {r['block_m']} x {r['block_n']} | "
                      f"{r['q_rows_per_tile']} | {r['pieces']} | {r['programs'] // LAYERS} | "
                      f"{r['kv_bytes'] / 1e9:.1f} | "
                      f"{r['kv_bytes'] / hbm:.0f} | {r['tc_flops'] / 1e12:.2f} | {r['tc_flops'] / useful:.1f} | "
                      f"{r['partial_bytes'] / 1e9:.2f} |")
        md.append(f"| {batch} x {ctx} | | minimum | | | | | {hbm / 1e9:.1f} | 1 | {useful / 1e12:.2f} | 1.0 | |")
    b, c = CASES[0]
    first = {(r["mode"], r["kernel"]): r for r in out["attention"][0]["rows"]}
    md += ["", f"At batch {b} x {c}: K/V loaded {first['exact', 'before']['kv_bytes'] / 1e9:.0f} GB -> "
           f"{first['exact', 'after']['kv_bytes'] / 1e9:.0f} GB per step (both modes); tensor-core work exact "
           f"{first['exact', 'before']['tc_flops'] / 1e12:.1f} -> {first['exact', 'after']['tc_flops'] / 1e12:.1f} "
           f"TFLOP, fast {first['fast', 'before']['tc_flops'] / 1e12:.2f} -> "
           f"{first['fast', 'after']['tc_flops'] / 1e12:.2f} TFLOP (useful "
           f"{out['attention'][0]['useful_flops'] / 1e12:.2f}).", "",
           "Exact mode does not split: split-KV would change the order of the reduction over keys, which must stay "
           "the training kernel's. Its longest program still walks the whole context (as before), so exact mode "
           "at small batch gains bytes and FLOPs, not latency; fast mode's pieces cut that walk to <= 1/16.", "",
           "## Exact-mode projections at decode (batch 64): CTAs per launch", "",
           "Before: 128 x 128 tiles for every M. After: BLOCK_M chosen by the row count among the tiles that "
           "compile to the 128-row tile's tensor-core instruction on the architecture (sm_90: 64 and 128; "
           "sm_80: 16 to 128); BLOCK_N 128 and BLOCK_K 64 fixed.", "",
           "| projection | N x K | before CTAs | " + " | ".join(f"{a}: BLOCK_M, CTAs / SMs" for a in SMS) + " |",
           "|---|---|---:|" + "---:|" * len(SMS)]
    for r in out["projections"]:
        md.append(f"| {r['projection']} | {r['n']} x {r['k']} | {r['before_ctas']} | " + " | ".join(
            f"{r[a]['block_m']}, {r[a]['ctas']} / {r[a]['sms']}" for a in SMS) + " |")
    md += ["", "On sm_90 a 64-row batch already fits one 64-row wgmma tile: the CTAs stay those of 128-row tiles "
           "(half the tensor-core work). 16- and 32-row tiles compile to mma.sync instead of wgmma there; whether "
           "those give the same bits as the training tile's wgmma is to be checked on an H100/H200 before they "
           "are allowed (linear.block_m_choices)."]
    results = Path(__file__).resolve().parent / "results"
    (results / "decode_work.json").write_text(json.dumps(out, indent=1) + "\n")
    (results / "decode_work.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
