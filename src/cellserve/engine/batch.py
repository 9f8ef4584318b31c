"""The persistent batch of one cell type (a stage), as in BatchMaker's in-place state and vLLM V1's
persistent batch.

A stage holds one row per request in that stage: its recurrent state and its bookkeeping (positions,
lengths, scores, arena offsets) in arrays that steps read and update in place. Rows stay where they are
while membership is unchanged, so a step runs on a contiguous block of rows with no gather or scatter;
a request that leaves is replaced by the last row (one row copied), one that joins is appended. When a
stage holds more rows than a step takes, steps take consecutive full windows in turn.
"""

from __future__ import annotations

import collections

import numpy as np

from cellserve.engine.request import Request


class Stage:
    """Row r of every array is request reqs[r]. All state widths share one float32 block and all fields
    one block per dtype, so moving a row is three copies whatever the model's depth; `states[name]` and
    `fields[name]` are views into those blocks (2-D views keep a contiguous last dimension, which the
    kernels take as is)."""

    def __init__(self, name: str, capacity: int, states: dict[str, int], fields: dict[str, type]):
        self.name = name
        self.capacity = int(capacity)
        self.state = np.zeros((self.capacity, max(1, sum(states.values()))), np.float32)
        self.states, offset = {}, 0
        for key, width in states.items():
            self.states[key] = self.state[:, offset:offset + width]
            offset += width
        fields = {"ticket": np.int64, **fields}
        kinds = {k: np.float64 if np.dtype(t).kind == "f" else np.int64 for k, t in fields.items()}
        self.blocks = {dtype: np.zeros((self.capacity, sum(1 for t in kinds.values() if t is dtype)), dtype)
                       for dtype in dict.fromkeys(kinds.values())}
        self.fields, columns = {}, collections.Counter()
        for key, dtype in kinds.items():
            self.fields[key] = self.blocks[dtype][:, columns[dtype]]
            columns[dtype] += 1
        self.reqs: list[Request] = []
        self.cursor = 0

    @property
    def n(self) -> int:
        return len(self.reqs)

    def __getitem__(self, field: str) -> np.ndarray:
        return self.fields[field]

    def add(self, reqs: list[Request], **values) -> slice:
        """Append a row per request (state zeroed) with the given field values (a scalar or one per
        request); returns their rows."""
        first, k = len(self.reqs), len(reqs)
        if first + k > self.capacity:
            raise RuntimeError(f"stage {self.name!r} is full ({self.capacity} rows)")
        rows = slice(first, first + k)
        for i, req in enumerate(reqs):
            req.rows[self.name] = first + i
        self.reqs.extend(reqs)
        self.state[rows] = 0
        self.fields["ticket"][rows] = [r.ticket for r in reqs]
        for name, v in values.items():
            self.fields[name][rows] = v
        return rows

    def remove(self, rows) -> list[Request]:
        """Take the given rows out; the last rows of the stage move into the holes (one copy per block
        for all of them). Returns the removed requests."""
        rows = sorted(set(int(r) for r in rows))
        if not rows:
            return []
        n, k = len(self.reqs), len(rows)
        gone = [self.reqs[r] for r in rows]
        leaving = set(rows)
        holes = [r for r in rows if r < n - k]
        if holes:
            movers = [m for m in range(n - k, n) if m not in leaving]
            self.state[holes] = self.state[movers]
            for block in self.blocks.values():
                block[holes] = block[movers]
            for hole, mover in zip(holes, movers):
                req = self.reqs[mover]
                self.reqs[hole] = req
                req.rows[self.name] = hole
        del self.reqs[n - k:]
        for req in gone:
            del req.rows[self.name]
        return gone

    def window(self, max_rows: int) -> tuple[int, int]:
        """The rows [a, b) the next step takes: all of them, or the next max_rows in turn. Every window is
        full: near the end of a round it overlaps rows that already ran this round, which simply advance
        once more (useful work for a sequence), so no step runs a sliver of a batch."""
        n = len(self.reqs)
        if n <= max_rows:
            self.cursor = 0
            return 0, n
        if self.cursor >= n:
            self.cursor = 0
        a = min(self.cursor, n - max_rows)
        self.cursor = a + max_rows
        return a, a + max_rows


def cell_steps(cell, xs: np.ndarray, state: tuple) -> np.ndarray:
    """t steps of one cell over xs (t, rows, in), its state views updated in place; returns (t, rows, H)."""
    if len(xs) == 1:
        cell.step_into(xs[0], state)
        return state[0][None]
    ys, new = cell.steps(np.ascontiguousarray(xs), state)
    for view, value in zip(state, new):
        view[...] = value
    return ys


def stage_steps(cell, stage: Stage, names: list[str], xs: np.ndarray, rows) -> np.ndarray:
    """t steps of one cell for some rows of a stage, whose state arrays are `names`. A slice of rows runs
    on the state in place; gathered rows (an index array) are copied out and back."""
    state = tuple(stage.states[name][rows] for name in names)
    ys = cell_steps(cell, xs, state)
    if not isinstance(rows, slice):
        for name, value in zip(names, state):
            stage.states[name][rows] = value
    return ys


def stack_steps(rnn, stage: Stage, names: list[list[str]], xs: np.ndarray, rows) -> np.ndarray:
    """Every layer of a stacked RNN over T steps for stage rows (a slice runs in place), reading and
    writing their state; xs (T, rows, in). Returns the top layer's outputs (T, rows, H)."""
    for cell, layer in zip(rnn.cells, names):
        xs = stage_steps(cell, stage, layer, xs, rows)
    return xs


def layer_state_names(rnn, prefix: str = "s") -> list[list[str]]:
    """State array names per layer of a stacked RNN, e.g. [["s0_0", "s0_1"], ["s1_0", "s1_1"]]."""
    return [[f"{prefix}{l}_{i}" for i in range(len(cell.state_widths()))] for l, cell in enumerate(rnn.cells)]


def layer_state_widths(rnn, prefix: str = "s") -> dict[str, int]:
    return {name: w for cell, layer in zip(rnn.cells, layer_state_names(rnn, prefix))
            for name, w in zip(layer, cell.state_widths())}
