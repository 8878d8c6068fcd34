import re

UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text):
    """Seconds in a duration such as "1h30m"."""
    total = 0
    for amount, unit in re.findall(r"(\d+)([a-z]+)", text):
        if unit not in UNITS:
            raise ValueError(f"unknown unit {unit!r} in {text!r}")
        total += int(amount) * UNITS[unit]
    return total
