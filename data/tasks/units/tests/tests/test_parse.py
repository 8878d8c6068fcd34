import pytest

from units.parse import parse_distance


def test_metres():
    assert parse_distance("12 m") == 12.0


def test_centimetres():
    assert parse_distance("25cm") == pytest.approx(0.25)


def test_rejects_garbage():
    with pytest.raises(ValueError):
        parse_distance("far away")
def test_decimal_metres():
    assert parse_distance("2.5 m") == 2.5


def test_kilometres():
    assert parse_distance("3 km") == 3000.0
    assert parse_distance("1.5 km") == 1500.0
