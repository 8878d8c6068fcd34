import pytest

from versions.compare import compare


def test_equal():
    assert compare("1.2.3", "1.2.3") == 0


def test_simple_order():
    assert compare("1.2.3", "1.2.4") == -1
    assert compare("2.0.0", "1.9.9") == 1


def test_invalid():
    with pytest.raises(ValueError):
        compare("1.2", "1.2.3")
def test_numeric_components():
    assert compare("1.10.0", "1.9.0") == 1
    assert compare("2.0.0", "10.0.0") == -1
    assert compare("0.1000.0", "0.999.0") == 1
