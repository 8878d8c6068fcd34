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
def test_third_attempt_succeeds():
    calls = []

    @retry(3)
    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("try again")
        return "done"
    assert flaky() == "done"
    assert len(calls) == 3


def test_reraises_after_last_attempt():
    @retry(2)
    def broken():
        raise OSError("always")
    with pytest.raises(OSError):
        broken()
