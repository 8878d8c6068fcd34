from textutil.slug import slugify


def test_simple():
    assert slugify("Hello") == "hello"
    assert slugify("a b") == "a-b"


def test_digits():
    assert slugify("Top 10") == "top-10"
def test_collapses_separators():
    assert slugify("a, b") == "a-b"


def test_strips_edges():
    assert slugify("  Hello, World!  ") == "hello-world"
