from calendarx.leap import days_in_month, is_leap


def test_common_years():
    assert not is_leap(2023)
    assert not is_leap(1900)


def test_leap_year():
    assert is_leap(2024)


def test_month_lengths():
    assert days_in_month(2023, 1) == 31
    assert days_in_month(2023, 4) == 30
    assert days_in_month(2023, 2) == 28
