def parse(version):
    """(major, minor, patch) of a "MAJOR.MINOR.PATCH" version."""
    parts = version.split(".")
    if len(parts) != 3 or not all(part.isdigit() for part in parts):
        raise ValueError(f"invalid version {version!r}")
    return tuple(int(part) for part in parts)


def compare(a, b):
    """-1, 0 or 1 as version a is older than, equal to or newer than version b."""
    pa, pb = parse(a), parse(b)
    return (pa > pb) - (pa < pb)
