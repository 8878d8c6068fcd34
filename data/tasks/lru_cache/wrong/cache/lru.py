from collections import OrderedDict


class LRUCache:
    """A mapping that holds at most `capacity` entries, evicting the least recently used one."""

    def __init__(self, capacity):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._data = OrderedDict()

    def get(self, key, default=None):
        if key not in self._data:
            return default
        self._data.move_to_end(key)
        return self._data[key]

    def put(self, key, value):
        if key not in self._data and len(self._data) >= self.capacity:
            self._data.popitem(last=True)
        self._data[key] = value
        self._data.move_to_end(key)

    def __len__(self):
        return len(self._data)

    def __contains__(self, key):
        return key in self._data
