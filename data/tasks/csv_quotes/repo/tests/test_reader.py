from csvtools.reader import read_rows


def test_rows_as_dicts():
    assert read_rows("a,b\n1,2\n3,4\n") == [{"a": "1", "b": "2"}, {"a": "3", "b": "4"}]
