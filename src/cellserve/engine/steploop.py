"""The native step loop's Python face (engine/native/steploop.cpp): runners that keep their running set in
native code and run many steps per call without the GIL.

A family offers one beside its Python runner when its model fits: token sequences through unidirectional
LSTM or GRU stacks (any weight storage the kernel core packs), read token by token (an encoder, a language
model) or greedily decoded. The Python runners stay the reference: `step_loop: python` picks them, and the
tests check that both loops give the same outputs. Requests map to rows by their engine ticket.
"""

from __future__ import annotations

import numpy as np

from cellserve.cells import GRUCell, LSTMCell
from cellserve.engine import _steploop
from cellserve.engine.request import Request
from cellserve.engine.runner import ADMITTED, Runner

STEP_LOOPS = ("native", "python")
READ, GENERATE = 0, 1  # a stage feeds its requests' tokens, or its own argmax
PICKS = {"stage": 0, "fullest": 1, "oldest": 2}
SLICE_S = 0.001  # the longest a call runs before Python looks at its queue and sessions again


def native_layers(rnn) -> list[tuple] | None:
    """The stack as the native loop takes it, or None when a layer is not one it runs (bidirectional,
    SRU/QRNN)."""
    if rnn.bidirectional:
        return None
    layers = []
    for cell in rnn.cells:
        if type(cell) is LSTMCell:
            step, limit = cell.cell_quant or (0.0, 0.0)
            layers.append((0, cell.ih.packed, cell.hh.packed, cell.bias, None, step, limit))
        elif type(cell) is GRUCell:
            layers.append((1, cell.ih.packed, cell.hh.packed, cell.b_ih, cell.b_hh, 0.0, 0.0))
        else:
            return None
    return layers


class NativeLoopRunner(Runner):
    """A runner whose stages live in a native Loop. Subclasses add the stages (`cell_types` order) and say
    what a request's row holds (`_admit_row`) and what a finished row's values mean (`_result`)."""

    step_loop = "native"

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self.loop = _steploop.Loop(self.capacity)
        self._reqs: dict[int, Request] = {}  # ticket -> request
        self.queued = np.zeros(1, np.int64)  # the engine's queue length, read by the loop between steps

    def ready(self, cell_type):
        return self.loop.ready(self.cell_types.index(cell_type))

    def oldest(self, cell_type):
        return self.loop.oldest(self.cell_types.index(cell_type))

    @property
    def used(self) -> int:
        return self.loop.used

    def admit(self, reqs):
        for req in reqs:
            self._admit_row(req)
            self._reqs[req.ticket] = req
        return [ADMITTED] * len(reqs)

    def _admit_row(self, req: Request) -> None:
        raise NotImplementedError

    def _result(self, value, next_token) -> dict:
        raise NotImplementedError

    def drop(self, req):
        self.loop.drop(req.ticket)
        self._reqs.pop(req.ticket, None)

    def step(self, cell_type, max_rows, pad_to=0):
        """One step of one stage (the Runner interface; the engine's policies call run_steps)."""
        left, steps = self._run(max_rows, pad_to, False, "stage", 1 << 30, self.capacity, 1, 0.0,
                                self.cell_types.index(cell_type), 1)
        self.last_rows = steps[0][1] if steps else 0
        return left

    def run_steps(self, max_rows: int, pad_to: int = 0, until_empty: bool = False, pick: str = "stage",
                  max_wait_steps: int = 8, max_running: int = 1, admit_batch: int = 1,
                  slice_s: float = SLICE_S) -> tuple[list[Request], list[tuple[str, int, int, float]]]:
        """Steps until a request leaves, queued requests can join, or the slice ends (cellular, stages picked
        as policies.py's Cellular does); with until_empty, every stage in turn to completion, each step padded
        to pad_to rows (graph). Returns (requests that left, [(cell type, rows, padded rows, seconds)])."""
        return self._run(max_rows, pad_to, until_empty, pick, max_wait_steps, max_running, admit_batch, slice_s,
                         -1, 1 << 30)

    def _run(self, max_rows, pad_to, until_empty, pick, max_wait_steps, max_running, admit_batch, slice_s, force,
             max_steps):
        before = self.loop.kernel_seconds
        left, steps = self.loop.run(self.cancel_flags, self.queued, max_rows, pad_to, until_empty, PICKS[pick],
                                    max_wait_steps, max_running, admit_batch, slice_s, force, max_steps)
        self.kernel_seconds += self.loop.kernel_seconds - before
        out = []
        for ticket, code, value, next_token in left:
            req = self._reqs.pop(ticket)
            if code == 0:
                req.result = self._result(value, next_token)
            out.append(req)
        return out, [(self.cell_types[s], rows, padded, seconds) for s, rows, padded, seconds in steps]
