"""Engine memory: per-request state slots, and arenas for ragged per-request data (tokens, frames,
outputs), so that a step finds every row's input or output place with one numpy index."""

from __future__ import annotations

import numpy as np


class StatePool:
    """Preallocated per-request state addressed by slot: a session's recurrent state between chunks, a
    tree's node states. Slots of one allocation are contiguous ([start, start + n)), so a tree's node i
    lives at start + i and its child lists can be kept in global arrays (see TreeRunner)."""

    def __init__(self, capacity: int, widths: dict[str, int], dtypes: dict[str, type] | None = None):
        self.capacity = int(capacity)
        dtypes = dtypes or {}
        self.arrays = {name: np.zeros((self.capacity, w) if w else self.capacity, dtype=dtypes.get(name, np.float32))
                       for name, w in widths.items()}
        self._free: list[list[int]] = [[0, self.capacity]]  # [start, length] ranges, sorted by start
        self._used = 0

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    @property
    def free(self) -> int:
        return self.capacity - self._used

    @property
    def used(self) -> int:
        return self._used

    def alloc(self, n: int) -> np.ndarray | None:
        """n contiguous slots with zeroed state, or None when no free range holds them now."""
        for i, (start, length) in enumerate(self._free):  # first fit
            if length >= n:
                if length == n:
                    del self._free[i]
                else:
                    self._free[i] = [start + n, length - n]
                for arr in self.arrays.values():
                    arr[start:start + n] = 0
                self._used += n
                return np.arange(start, start + n, dtype=np.int64)
        return None

    def release(self, slots: np.ndarray) -> None:
        """Give back an allocation (the array alloc returned)."""
        start, n = int(slots[0]), len(slots)
        self._used -= n
        ranges = self._free
        i = next((j for j, (s, _) in enumerate(ranges) if s > start), len(ranges))
        ranges.insert(i, [start, n])
        if i + 1 < len(ranges) and ranges[i][0] + ranges[i][1] == ranges[i + 1][0]:  # merge with the next
            ranges[i][1] += ranges.pop(i + 1)[1]
        if i > 0 and ranges[i - 1][0] + ranges[i - 1][1] == ranges[i][0]:  # and the previous
            ranges[i - 1][1] += ranges.pop(i)[1]


class Arena:
    """Ragged per-request arrays (a request's tokens, frames or outputs) packed into one array. Blocks
    come in power-of-two sizes and freed blocks are reused by size, so offsets never move; the array
    doubles when it runs out."""

    def __init__(self, width: int = 0, dtype=np.float32, capacity: int = 1 << 14):
        self.width, self.dtype = int(width), dtype
        self.data = np.zeros((capacity, width) if width else capacity, dtype=dtype)
        self.top = 0
        self._free: dict[int, list[int]] = {}

    @staticmethod
    def _size(n: int) -> int:
        return 1 << max(4, int(n - 1).bit_length())

    def alloc(self, n: int) -> int:
        size = self._size(n)
        blocks = self._free.get(size)
        if blocks:
            return blocks.pop()
        if self.top + size > len(self.data):
            grown = np.zeros((max(2 * len(self.data), self.top + size),) + self.data.shape[1:], dtype=self.dtype)
            grown[: self.top] = self.data[: self.top]
            self.data = grown
        offset, self.top = self.top, self.top + size
        return offset

    def put(self, values: np.ndarray) -> int:
        offset = self.alloc(len(values))
        self.data[offset:offset + len(values)] = values
        return offset

    def free(self, offset: int, n: int) -> None:
        self._free.setdefault(self._size(n), []).append(int(offset))
