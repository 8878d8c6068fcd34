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
def test_evicts_least_recently_used():
    cache = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.put("c", 3)
    assert "a" not in cache
    assert "b" in cache and "c" in cache


def test_get_refreshes():
    cache = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.get("a")
    cache.put("c", 3)
    assert "a" in cache and "b" not in cache
