import re
from collections import Counter


def top_words(text, k):
    """The k most frequent words (case-insensitive) with their counts; ties in alphabetical order."""
    counts = Counter(re.findall(r"[a-z']+", text.lower()))
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:k]
