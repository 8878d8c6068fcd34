import pytest

from listutil.chunks import chunked


def test_even_split():
    assert chunked([1, 2, 3, 4], 2) == [[1, 2], [3, 4]]


def test_size_must_be_positive():
    with pytest.raises(ValueError):
        chunked([1, 2], 0)
