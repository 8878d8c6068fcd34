from wordfreq.count import top_words


def test_counts():
    assert top_words("b a b c b a", 2) == [("b", 3), ("a", 2)]


def test_case_insensitive():
    assert top_words("Go go GO", 1) == [("go", 3)]
def test_ties_alphabetical():
    assert top_words("pear apple pear apple fig", 2) == [("apple", 2), ("pear", 2)]
    assert top_words("c b a", 3) == [("a", 1), ("b", 1), ("c", 1)]
