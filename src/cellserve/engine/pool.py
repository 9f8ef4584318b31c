"""Preallocated per-request state, addressed by slot: a batch step gathers rows by an index array
and scatters them back, with no per-request copies in Python."""

from __future__ import annotations

import numpy as np


class StatePool:
    def __init__(self, capacity: int, widths: dict[str, int], dtypes: dict[str, type] | None = None):
        self.capacity = int(capacity)
        dtypes = dtypes or {}
        self.arrays = {name: np.zeros((self.capacity, w) if w else self.capacity, dtype=dtypes.get(name, np.float32))
                       for name, w in widths.items()}
        self._free = list(range(self.capacity - 1, -1, -1))

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.capacity - len(self._free)

    def alloc(self, n: int) -> np.ndarray | None:
        """n slots with zeroed state, or None when the pool cannot hold them now."""
        if n > len(self._free):
            return None
        slots = np.array([self._free.pop() for _ in range(n)], dtype=np.int64)
        for arr in self.arrays.values():
            arr[slots] = 0
        return slots

    def release(self, slots: np.ndarray) -> None:
        self._free.extend(int(s) for s in slots)
