def in_range(value, low, high, inclusive=True):
    """Whether low <= value <= high (or low < value < high when not inclusive)."""
    if inclusive:
        return low <= value < high
    return low < value < high
