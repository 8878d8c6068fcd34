"""Exact-mode linear with M tiles chosen by the row count: a row gets the same bits whatever the tile (fixed
BLOCK_N, BLOCK_K and K order), and the tile choice follows the device's tensor-core instruction.

The bitwise tests compare rows at different places in different tile shapes: under the interpreter they need a
tl.dot whose rows do not depend on their place in the tile (tests/conftest.py), as on a GPU."""
import pytest
import torch

from protege.kernels.ops import linear
from protege.kernels.ops.linear import BLOCK_MS, _matmul, block_m_choices, linear_triton, pick_block_m


def make(m, k, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    return x, w, torch.randn(n, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_m_tile_gives_the_same_bits(dtype):
    x, w, b = make(300, 80, 160, dtype)  # K = 80: a K remainder; N = 160: two N tiles
    outs = {bm: _matmul(x, x.stride(), w, (w.stride(1), w.stride(0)), 300, 160, 80, b, dtype, block_m=bm)
            for bm in BLOCK_MS}
    for bm, y in outs.items():
        assert torch.equal(y, outs[128]), f"BLOCK_M={bm}"
    # The public op: one row alone (a 16-row tile) against the 300-row launch with 128-row tiles.
    for r in (0, 17, 299):
        assert torch.equal(linear_triton(x[r:r + 1], w, b), outs[128][r:r + 1]), f"row {r}"


def test_tile_choices_follow_the_instruction():
    bf16 = torch.bfloat16
    assert block_m_choices((9, 0), bf16) == (64, 128)  # wgmma needs 64 rows a warpgroup
    assert block_m_choices((8, 0), bf16) == BLOCK_MS   # mma.sync m16n8k16 everywhere
    assert block_m_choices((9, 0), torch.float32) == BLOCK_MS  # no tensor cores
    assert block_m_choices((10, 0), bf16) == (128,)    # not checked: the training tile only
    # Qwen2.5-7B at decode (64 rows) on 132 SMs, and a training pack of 16K rows.
    assert pick_block_m(64, 3584, BLOCK_MS, 132) == 16    # q_proj: 4 x 28 CTAs instead of 28
    assert pick_block_m(64, 512, (64, 128), 132) == 64
    assert pick_block_m(16384, 512, BLOCK_MS, 132) == 128
    assert pick_block_m(300, 3584, BLOCK_MS, 132) == 64   # 5 x 28 CTAs
    assert linear.num_warps(64) == 4 and linear.num_warps(128) == 8
