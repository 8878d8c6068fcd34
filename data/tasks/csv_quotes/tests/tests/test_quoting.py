from csvtools.reader import parse_line, read_rows


def test_plain_fields():
    assert parse_line("x,y,z") == ["x", "y", "z"]


def test_quoted_comma():
    assert parse_line('1,"Smith, John",3') == ["1", "Smith, John", "3"]


def test_escaped_quote():
    assert parse_line('"say ""hi""",2') == ['say "hi"', "2"]


def test_quoted_rows():
    assert read_rows('name,city\n"Doe, Jane","Paris"\n') == [{"name": "Doe, Jane", "city": "Paris"}]
