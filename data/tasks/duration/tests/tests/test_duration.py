import pytest

from timeparse.duration import parse_duration


def test_hours_and_minutes():
    assert parse_duration("1h30m") == 5400


def test_unknown_unit():
    with pytest.raises(ValueError):
        parse_duration("3w")
def test_seconds():
    assert parse_duration("1m30s") == 90


def test_days():
    assert parse_duration("2d1h") == 2 * 86400 + 3600
