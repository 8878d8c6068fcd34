from mathutil.ranges import in_range


def test_inside():
    assert in_range(5, 1, 10)
    assert not in_range(11, 1, 10)


def test_exclusive_bounds():
    assert not in_range(1, 1, 10, inclusive=False)
    assert not in_range(10, 1, 10, inclusive=False)
def test_inclusive_bounds():
    assert in_range(1, 1, 10)
    assert in_range(10, 1, 10)
