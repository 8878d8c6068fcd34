from intervals.merge import merge


def test_sorted_overlapping():
    assert merge([(1, 3), (2, 5), (7, 8)]) == [(1, 5), (7, 8)]


def test_touching():
    assert merge([(1, 2), (2, 3)]) == [(1, 3)]


def test_empty():
    assert merge([]) == []
def test_unsorted_input():
    assert merge([(5, 6), (1, 10), (2, 3)]) == [(1, 10)]
    assert merge([(8, 9), (1, 2)]) == [(1, 2), (8, 9)]
