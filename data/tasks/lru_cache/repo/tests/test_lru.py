import pytest

from cache.lru import LRUCache


def test_put_get():
    cache = LRUCache(2)
    cache.put("a", 1)
    assert cache.get("a") == 1
    assert cache.get("missing", 0) == 0


def test_capacity_validation():
    with pytest.raises(ValueError):
        LRUCache(0)


def test_len_never_exceeds_capacity():
    cache = LRUCache(2)
    for i in range(5):
        cache.put(i, i)
    assert len(cache) == 2
