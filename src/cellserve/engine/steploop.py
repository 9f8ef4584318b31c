"""The native step loop's Python face (engine/native/steploop.cpp): runners that keep their running set in
native code and step it without the GIL.

A family offers one beside its Python runner when its model fits: token sequences through unidirectional
LSTM, GRU, SRU or QRNN stacks (any weight storage the kernel core packs), read token by token (an encoder, a
language model) or greedily decoded; frame sequences through such stacks, in blocks of k frames
(engine/frames.py's NativeStreamRunner); and child-sum TreeLSTM trees (families/tree.py's NativeTreeRunner).
The Python runners stay the reference: `step_loop: python` picks them, and the tests check that both loops
give the same outputs.

Two ways to drive it: `run_steps` runs every stage to completion in one call on the engine's thread (graph and
none; `step` runs one step, the Runner interface); `start_worker` / `collect` run cellular batching on a
native thread that never waits for Python, while the engine's thread admits requests and resolves futures
beside it.
"""

from __future__ import annotations

import itertools

import numpy as np

from cellserve.cells import GRUCell, LSTMCell, QRNNCell, SRUCell
from cellserve.engine import _steploop
from cellserve.engine.request import Request
from cellserve.engine.runner import ADMITTED, Runner
from cellserve.engine.steps import STEP_RECORD

READ, GENERATE = 0, 1  # a stage feeds its requests' tokens, or its own argmax
PICKS = {"stage": 0, "fullest": 1, "oldest": 2, "earliest": 3}


def native_layers(rnn) -> list[tuple] | None:
    """The stack as the native loop takes it, or None when it is not one it runs (bidirectional)."""
    if rnn.bidirectional:
        return None
    layers = []
    for cell in rnn.cells:
        if type(cell) is LSTMCell:
            step, limit = cell.cell_quant or (0.0, 0.0)
            layers.append((0, cell.ih.packed, cell.hh.packed, cell.bias, None, step, limit))
        elif type(cell) is GRUCell:
            layers.append((1, cell.ih.packed, cell.hh.packed, cell.b_ih, cell.b_hh, 0.0, 0.0))
        elif type(cell) is SRUCell:  # its activation is part of the kind
            vectors = np.concatenate([cell.v_f, cell.v_r, cell.b_f, cell.b_r]).astype(np.float32)
            layers.append((2 if cell.activation == "tanh" else 3, cell.w.packed, None, vectors, None, 0.0, 0.0))
        elif type(cell) is QRNNCell:  # and its window
            layers.append((3 + cell.window, cell.w.packed, None, cell.bias, None, 0.0, 0.0))
        else:
            return None
    return layers


class NativeLoopRunner(Runner):
    """A runner whose stages live in a native Loop. Subclasses add the stages (`cell_types` order) and say
    what a request's row holds (`_row`) and what a finished row's values mean (`_result`)."""

    step_loop = "native"
    admit_on_submit = True  # the submitting thread may admit (cheap admission: no model compute in it)

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self.loop = _steploop.Loop(self.capacity)
        self._ids = itertools.count()
        self._reqs: dict[int, Request] = {}  # the loop's row id -> request
        self.queued = np.zeros(1, np.int64)  # the engine's queue length, read by the loop between steps

    def ready(self, cell_type):
        return self.loop.ready(self.cell_types.index(cell_type))

    def oldest(self, cell_type):
        return self.loop.oldest(self.cell_types.index(cell_type))

    @property
    def used(self) -> int:
        return self.loop.used

    def admit(self, reqs):
        rows = []
        for req in reqs:
            req.progress["row"] = row = next(self._ids)
            self._reqs[row] = req
            rows.append((*self._row(row, req), req.traced))
        self.loop.admit(rows)  # together: they join at the same step
        return [ADMITTED] * len(reqs)

    def _row(self, row: int, req: Request) -> tuple:
        """(stage, row id, ticket, arrival, tokens, max_len, stop at EOS): what the loop takes of a request."""
        raise NotImplementedError

    def _result(self, value, next_token) -> dict:
        raise NotImplementedError

    def _set_results(self, finished: list[tuple]) -> None:
        """Results of the requests that finished ((request, value, next token) each), together."""
        for req, value, next_token in finished:
            req.result = self._result(value, next_token)

    def drop(self, req):
        row = req.progress.pop("row", None)
        if row is not None and self._reqs.pop(row, None) is not None:
            self.loop.drop(row)
            self._left(req)

    def _left(self, req: Request) -> None:
        """A request left the loop (finished, cancelled or dropped): give back what the runner counted for it."""

    def step(self, cell_type, max_rows, pad_to=0):
        """One step of one stage (the Runner interface; the engine's policies call run_steps or the worker)."""
        left, steps = self._finish(*self.loop.run(self.cancel_flags, max_rows, pad_to, self.cell_types.index(cell_type)))
        self.last_rows = int(steps["rows"][0]) if len(steps) else 0
        return left

    def run_steps(self, max_rows: int, pad_to: int = 0) -> tuple[list[Request], np.ndarray]:
        """Every stage in turn to completion on this thread, each step padded to pad_to rows (graph). Returns
        (requests that left, steps): engine/steps.py's STEP_RECORD array, a stage indexing cell_types."""
        return self._finish(*self.loop.run(self.cancel_flags, max_rows, pad_to, -1))

    def start_worker(self, max_rows: int, pick: str, max_wait_steps: int, max_running: int, threads: int) -> None:
        """Cellular batching on the loop's own thread until stop_worker(); collect() hands back its results."""
        self.loop.start(self.cancel_flags, self.queued, max_rows, PICKS[pick], max_wait_steps, max_running, threads)

    def stop_worker(self) -> None:
        self.loop.stop()

    def collect(self, timeout_s: float) -> tuple[list[Request], np.ndarray]:
        """The worker's finished requests and steps since the last call, waiting up to timeout_s for one to
        leave or for wake()."""
        return self._finish(*self.loop.collect(timeout_s))

    def wake(self) -> None:
        self.loop.wake()

    def _finish(self, left, records: bytes):
        out, finished = [], []
        for row, code, value, next_token, numbers in left:
            req = self._reqs.pop(row, None)
            if req is None:  # dropped while it ran
                continue
            req.progress.pop("row", None)
            self._left(req)
            req.step_numbers = numbers  # a traced request's steps (the numbers in the step records)
            if code == 0:
                finished.append((req, value, next_token))
            out.append(req)
        self._set_results(finished)
        steps = np.frombuffer(records, STEP_RECORD)
        self.kernel_seconds += float(steps["kernel"].sum())
        return out, steps
