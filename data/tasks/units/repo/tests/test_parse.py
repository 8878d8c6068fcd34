import pytest

from units.parse import parse_distance


def test_metres():
    assert parse_distance("12 m") == 12.0


def test_centimetres():
    assert parse_distance("25cm") == pytest.approx(0.25)


def test_rejects_garbage():
    with pytest.raises(ValueError):
        parse_distance("far away")
