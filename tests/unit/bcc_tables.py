"""A BCC table stood in for, for unit tests of the modules that read and write BPF maps
(agent/inject/redirect.py, agent/inject/cgroup_watch.py) where no kernel can load one."""

from __future__ import annotations

import ctypes as ct
from typing import Any


class Table:
    """A BCC table: keys and values are ctypes objects of its Key and Leaf classes, stored
    by their bytes; reading an item gives a copy (writing a field of it changes nothing
    until it is written back); a missing key is a KeyError; an array has its size."""

    def __init__(self, key: Any, leaf: Any, map_fd: int, size: int | None = None):
        self.Key, self.Leaf, self.map_fd, self.size = key, leaf, map_fd, size
        self.data: dict[bytes, bytes] = {}

    def _raw(self, key: Any) -> bytes:
        assert ct.sizeof(key) == ct.sizeof(self.Key), key
        raw = bytes(key)
        if self.size is not None and not 0 <= int.from_bytes(raw, "little") < self.size:
            raise KeyError(raw)  # BCC: an index out of the array's range
        return raw

    def __getitem__(self, key: Any) -> Any:
        return self.Leaf.from_buffer_copy(self.data[self._raw(key)])

    def __setitem__(self, key: Any, leaf: Any) -> None:
        assert ct.sizeof(leaf) == ct.sizeof(self.Leaf), leaf
        self.data[self._raw(key)] = bytes(leaf)

    def __delitem__(self, key: Any) -> None:
        del self.data[self._raw(key)]

    def keys(self) -> list[Any]:
        return [self.Key.from_buffer_copy(raw) for raw in self.data]

    def __iter__(self):
        return iter(self.keys())

    def items(self) -> list[tuple[Any, Any]]:
        return [(k, self[k]) for k in self.keys()]
