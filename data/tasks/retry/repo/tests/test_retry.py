import pytest

from retrying.retry import retry


def test_success_first_try():
    @retry(3)
    def ok():
        return 42
    assert ok() == 42


def test_other_exceptions_propagate():
    @retry(3, exceptions=(KeyError,))
    def bad():
        raise ValueError("not retried")
    with pytest.raises(ValueError):
        bad()
