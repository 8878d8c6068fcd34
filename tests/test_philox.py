"""Philox4x32-10 row uniforms (the sampler's batched RNG): the PyTorch path against Random123's published
known-answer vectors, the Triton kernel (interpreter) bit for bit against it, and the numbers' distribution."""
import importlib

import pytest
import torch

from protege.kernels import reference

philox = importlib.import_module("protege.kernels.ops.philox")

# Random123's kat_vectors for philox4x32_10: (counter words, key words) -> output words.
KAT = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
       ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
       ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_reference_matches_random123_known_answers(counter, key, expected):
    words = reference.philox4x32(tuple(torch.tensor([c]) for c in counter), tuple(torch.tensor([k]) for k in key))
    assert tuple(int(w) for w in words) == expected


def test_uniform_is_the_first_two_words_as_53_bits():
    u = reference.philox_uniforms(torch.tensor([0]), torch.tensor([0]))
    assert u.dtype == torch.float64
    assert u.item() == ((0x6627E8D5 >> 5) * 2 ** 26 + (0xE169C58D >> 6)) / 2 ** 53


@pytest.mark.parametrize("n", [256, 1, 1000])   # one full block, one row, an odd count over several blocks
def test_triton_equals_reference_bitwise(n):
    g = torch.Generator().manual_seed(n)
    seeds = torch.randint(0, 2 ** 63 - 1, (n,), generator=g)
    counters = torch.randint(0, 2 ** 40, (n,), generator=g)
    seeds[0], counters[0] = 2 ** 63 - 1, 2 ** 32   # both key words and the high counter word in play
    got = philox.philox_uniforms_triton(seeds, counters)
    assert torch.equal(got, reference.philox_uniforms(seeds, counters))
    assert torch.equal(philox.philox_uniforms_triton(torch.empty(0, dtype=torch.int64),
                                                      torch.empty(0, dtype=torch.int64)),
                       torch.empty(0, dtype=torch.float64))


def test_numbers_are_uniform_and_streams_differ():
    n = 200_000
    counters = torch.arange(n)
    u = reference.philox_uniforms(torch.full((n,), 12345), counters)   # one stream along its counter
    assert 0 <= u.min() and u.max() < 1
    counts = torch.histc(u, bins=20, min=0, max=1)
    expected = n / 20
    assert ((counts - expected).abs() <= 5 * (expected * (1 - 1 / 20)) ** 0.5).all(), counts
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1]) < 0.01   # neighbours uncorrelated
    other = reference.philox_uniforms(torch.full((n,), 12346), counters)    # the next seed: another stream
    assert abs(torch.corrcoef(torch.stack([u, other]))[0, 1]) < 0.01 and not torch.equal(u, other)
