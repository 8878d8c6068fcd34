NUMERALS = [
    (1000, "M"),
    (500, "D"),
    (100, "C"),
    (50, "L"),
    (10, "X"),
    (5, "V"),
    (1, "I"),
]


def to_roman(number):
    """Roman numeral for 1 <= number <= 3999."""
    if not 0 < number < 4000:
        raise ValueError(f"{number} is out of range (1..3999)")
    letters = []
    for value, symbol in NUMERALS:
        count, number = divmod(number, value)
        letters.append(symbol * count)
    return "".join(letters)
