from csvtools.quoting import split_quoted


def parse_line(line):
    """Fields of one comma-separated line."""
    return split_quoted(line)


def read_rows(text):
    """Rows of a CSV text whose first line is the header, as dicts."""
    lines = [line for line in text.splitlines() if line.strip()]
    header = parse_line(lines[0])
    return [dict(zip(header, parse_line(line))) for line in lines[1:]]
