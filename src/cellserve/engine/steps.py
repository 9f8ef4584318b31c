"""Step records: what the engine counts of each batched step a native loop or a front end's lane ran.

They arrive as arrays of STEP_RECORD (the native loop hands its records as one bytes object of that layout),
hundreds at a time while a worker is busy, and are counted array by array: as a list of Python tuples they
cost the engine's thread more per request at one client than the request's decoding.
"""

from __future__ import annotations

import collections

import numpy as np

# engine/native/steploop.cpp's StepRecord: stage (an index into the runner's cell types), rows, padding rows,
# the step's busy seconds, the part inside the model's kernels, its end (time.perf_counter's clock), and the
# loop's number for it (what a traced request's step numbers name)
STEP_RECORD = np.dtype({"names": ["stage", "rows", "padded", "seconds", "kernel", "end", "number"],
                        "formats": ["<i4", "<i4", "<i4", "<f8", "<f8", "<f8", "<i8"],
                        "offsets": [0, 4, 8, 16, 24, 32, 40], "itemsize": 48})


def step_records(**fields) -> np.ndarray:
    """Records built in Python (a lane's step, the Python loop's): one per value of each field."""
    n = len(next(iter(fields.values())))
    records = np.zeros(n, STEP_RECORD)
    for name, values in fields.items():
        records[name] = values
    return records


class StepLog:
    """The engine's last `limit` steps, for traced requests: the arrays as they came, with the cell type names
    their stage indices mean, turned into (end, seconds, cell type, rows, number) tuples only when a traced
    request reads them."""

    def __init__(self, limit: int):
        self.limit = limit
        self._chunks: collections.deque = collections.deque()
        self._count = 0

    def add(self, cell_types, records: np.ndarray) -> None:
        self._chunks.append((cell_types, records))
        self._count += len(records)
        while self._count - len(self._chunks[0][1]) >= self.limit:
            self._count -= len(self._chunks.popleft()[1])

    def entries(self) -> list[tuple]:
        """The kept steps in order, the oldest dropped past `limit` (safe while the engine's thread adds)."""
        out = []
        for cell_types, records in list(self._chunks):
            sizes = (records["rows"] + records["padded"]).tolist()
            out.extend(zip(records["end"].tolist(), records["seconds"].tolist(),
                           [cell_types[s] for s in records["stage"].tolist()], sizes, records["number"].tolist()))
        return out[-self.limit:]
