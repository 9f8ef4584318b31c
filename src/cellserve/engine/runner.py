"""The Runner interface: how one model family's requests become batched cell steps.

A runner owns a model, its batch memory and its session slots. The engine asks it to `prepare` a
request's inputs (validate them), to `admit` requests (put them into their first stage), how many rows
each stage has `ready`, and to `step` a stage: run its next window of rows and hand back the requests
that left (finished with `result` set, or dropped because they were cancelled). A stream's state between
chunks lives in the runner too: the engine only says when a session closes (`close_session`).

Sequence runners keep their rows in persistent per-stage batches (engine/batch.py) and share the window
and leaving logic of SequenceRunner; per-row bookkeeping is numpy over the window, so a step costs the
same number of Python calls whatever its batch size. `pad_to` widens a step with dummy rows, which is
how the graph baseline pays for padding. Runners know nothing of threads, HTTP or gRPC.
"""

from __future__ import annotations

import numpy as np

from cellserve.engine.batch import Stage
from cellserve.engine.request import Request, Session

ADMITTED, NO_ROOM, DONE = "admitted", "no room", "done"  # what admit() says of each request


def token_array(value, name: str, vocab: int, min_len: int = 1) -> np.ndarray:
    """A request's token ids, checked: 1-D, integer, inside the vocabulary. ValueError says what is wrong."""
    arr = np.asarray(value)
    if arr.ndim != 1 or len(arr) < min_len:
        raise ValueError(f"{name} must be a 1-D list of at least {min_len} token ids, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer token ids, got {arr.dtype}")
    # a short request's range from a list: numpy's min and max cost ~2 us each a call, a third of a request's
    # checks on the serving path
    if len(arr) <= 256:
        ids = arr.tolist()
        lo, hi = min(ids), max(ids)
    else:
        lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"{name} token ids must be in [0, {vocab}), got {lo}..{hi}")
    return arr.astype(np.int64)


class Runner:
    """What the engine needs of a model family's execution. Subclasses set `cell_types` (stages,
    earliest first: later stages finish requests sooner)."""

    cell_types: tuple[str, ...] = ()
    pads = True  # sequence models pad finished requests in the graph baseline; trees do not
    step_loop = "python"  # who runs the steps: this Python code, or the native loop (engine/steploop.py)
    default_pick = "stage"  # the engine's cellular pick when none is given

    def __init__(self, capacity: int):
        self.capacity = int(capacity)  # rows (requests) it can hold at once; tree nodes for trees
        self.cancel_flags = np.zeros(0, bool)  # the engine's, indexed by Request.ticket
        self.kernel_seconds = 0.0  # time inside the model's compute (kernels), for the overhead metric
        self.last_rows = 0  # rows (without padding) of the last step
        self.last_padding = 0.0  # padding the last step computed, in rows (for the engine's padding share)

    def prepare(self, inputs: dict) -> tuple[object, int]:
        """Validate inputs; return (payload, state slots needed). Raises ValueError."""
        raise NotImplementedError

    def length(self, payload) -> int:
        """The request's size for length bucketing (tokens, source tokens or tree nodes)."""
        return len(payload)

    def admit(self, reqs: list[Request]) -> list:
        """Put requests into their first stage; for each: ADMITTED, NO_ROOM (try again later), DONE (its
        result is already known, e.g. a chunk whose frames all wait for a full block) or the exception
        that failed it alone."""
        out = []
        for req in reqs:  # one at a time, stopping at the first that finds no room (keeps arrival order)
            if out and out[-1] == NO_ROOM:
                out.append(NO_ROOM)
                continue
            try:
                out.append(self._admit(req))
            except Exception as exc:
                out.append(exc)
        return out

    def _admit(self, req: Request) -> str:
        raise NotImplementedError

    def ready(self, cell_type: str) -> int:
        raise NotImplementedError

    def oldest(self, cell_type: str) -> float:
        """Arrival time of the oldest request with rows ready in this stage."""
        raise NotImplementedError

    def step(self, cell_type: str, max_rows: int, pad_to: int = 0) -> list[Request]:
        raise NotImplementedError

    def drop(self, req: Request) -> None:
        """Forget a request that will not finish (cancelled, failed, engine stopped): free its memory."""
        raise NotImplementedError

    def close_session(self, session: Session) -> None:
        """A session ended (its last chunk, a failure, expiry or a restart): free what it held."""

    def check_snapshot(self, snapshot: dict) -> None:
        """Raise ValueError unless `snapshot` is a session state this runner can restore."""
        raise ValueError("this model keeps no state between requests: there is no sequence to restore")

    @property
    def used(self) -> int:
        raise NotImplementedError


def pad_rows(values: np.ndarray, pad: int, axis: int = 0) -> np.ndarray:
    """`values` with `pad` zero rows appended along `axis`: the dummy rows of a padded (graph) step."""
    if not pad:
        return values
    shape = list(values.shape)
    shape[axis] = pad
    return np.concatenate([values, np.zeros(shape, values.dtype)], axis=axis)


class SequenceRunner(Runner):
    """Runners whose requests hold one row per stage they are in (token and frame sequences)."""

    def __init__(self, capacity: int, stages: list[Stage]):
        super().__init__(capacity)
        self.stages = {s.name: s for s in stages}

    def ready(self, cell_type):
        return self.stages[cell_type].n

    def oldest(self, cell_type):
        stage = self.stages[cell_type]
        return float(stage["arrival"][: stage.n].min())

    @property
    def used(self) -> int:
        return len({id(r) for s in self.stages.values() for r in s.reqs})

    def _window(self, stage: Stage, max_rows: int) -> tuple[int, int, list[Request]]:
        """The next window of rows, after dropping the cancelled requests found in it (their flags are
        read for these rows only). Returns (a, b, dropped)."""
        dropped = []
        while True:
            a, b = stage.window(max_rows)
            flagged = np.flatnonzero(self.cancel_flags[stage["ticket"][a:b]])
            if not len(flagged):
                return a, b, dropped
            for req in [stage.reqs[a + i] for i in flagged]:
                self.drop(req)
                dropped.append(req)
            stage.cursor = a

    def drop(self, req):
        for name in list(req.rows):
            self.stages[name].remove([req.rows[name]])
        self._free(req)

    def _free(self, req: Request) -> None:
        """Give back a request's arena blocks."""

    def _leave(self, stage: Stage, rows, finished: list[Request]) -> None:
        """Rows whose requests finished: free their memory and take them out of the stage."""
        for req in stage.remove(rows):
            self._free(req)
            finished.append(req)

    def _padding(self, stage: Stage, a: int, b: int, pad_to: int) -> int:
        pad = max(0, pad_to - (b - a))
        if b + pad > stage.capacity:
            raise RuntimeError(f"stage {stage.name!r} cannot pad {b - a} rows to {pad_to}")
        return pad
