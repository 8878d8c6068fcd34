"""Per-row uniform numbers from a counter-based generator (Philox4x32-10) in one launch: row i's number is a
function of (seeds[i], counters[i]) only, so the sampler draws a whole batch at once and every row still gets
the numbers of its own request's stream. Bit for bit kernels.reference.philox_uniforms."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 256


@triton.jit
def _philox_uniform_kernel(SEEDS, COUNTERS, OUT, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    seed = tl.load(SEEDS + offs, mask=mask, other=0)
    counter = tl.load(COUNTERS + offs, mask=mask, other=0)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    m0 = tl.full(c0.shape, 0xD2511F53, tl.uint32)
    m1 = tl.full(c0.shape, 0xCD9E8D57, tl.uint32)
    for _ in tl.static_range(10):
        # The .to(uint32) keep every word 32 bits wide whatever type promotion the constants get.
        hi0, lo0 = tl.umulhi(c0, m0), (c0 * m0).to(tl.uint32)
        hi1, lo1 = tl.umulhi(c2, m1), (c2 * m1).to(tl.uint32)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + 0x9E3779B9).to(tl.uint32)
        k1 = (k1 + 0xBB67AE85).to(tl.uint32)
    bits = (c0 >> 5).to(tl.int64) * 67108864 + (c1 >> 6).to(tl.int64)
    tl.store(OUT + offs, bits.to(tl.float64) * 1.1102230246251565e-16, mask=mask)  # 2^-53


def philox_uniforms_triton(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    seeds, counters = seeds.long().contiguous(), counters.long().contiguous()
    out = torch.empty(seeds.shape, dtype=torch.float64, device=seeds.device)
    if seeds.numel():
        _philox_uniform_kernel[(triton.cdiv(seeds.numel(), BLOCK),)](seeds, counters, out, seeds.numel(),
                                                                      BLOCK=BLOCK)
    return out
