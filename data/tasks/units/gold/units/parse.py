import re

from units.table import FACTORS

PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*$")


def parse_distance(text):
    """Metres in a distance such as "25 cm"."""
    match = PATTERN.match(text)
    if match is None:
        raise ValueError(f"cannot parse distance {text!r}")
    number, unit = match.groups()
    if unit not in FACTORS:
        raise ValueError(f"unknown unit {unit!r}")
    return float(number) * FACTORS[unit]
