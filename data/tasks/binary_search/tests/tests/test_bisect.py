from search.bisect import find


def test_middle():
    assert find([1, 3, 5, 7, 9], 5) == 2


def test_missing():
    assert find([1, 3, 5, 7, 9], 4) == -1
    assert find([1, 3, 5, 7, 9], 10) == -1


def test_empty():
    assert find([], 1) == -1
def test_single_element():
    assert find([4], 4) == 0


def test_finds_every_element():
    items = [1, 3, 5, 7, 9]
    assert [find(items, x) for x in items] == [0, 1, 2, 3, 4]
