from wordfreq.count import top_words


def test_counts():
    assert top_words("b a b c b a", 2) == [("b", 3), ("a", 2)]


def test_case_insensitive():
    assert top_words("Go go GO", 1) == [("go", 3)]
