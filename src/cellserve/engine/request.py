"""A request inside the engine, and the errors the engine reports to its callers."""

from __future__ import annotations

import collections
import itertools
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

_ids = itertools.count()


class EngineError(Exception):
    """Base of the errors a caller sees from the engine."""


class EngineFull(EngineError):
    """Admission refused: the waiting queue is at capacity."""


class EngineStopped(EngineError):
    """The engine shut down before the request finished."""


class SessionError(EngineError, ValueError):
    """A chunk names a sequence that is unknown, expired or busy (the caller's mistake: HTTP 400)."""


class SessionsFull(EngineFull):
    """A new sequence was refused: the model holds its maximum of open sequences (HTTP 503)."""


@dataclass(eq=False)
class Session:
    """A stream's recurrent state, kept in the pool between chunks. Chunks run one at a time, in order:
    while one is queued or running, later ones wait here."""

    id: str
    slots: np.ndarray | None = None  # allocated when its first chunk is admitted
    buffer: object = None  # runner-private: input not yet consumed (e.g. frames short of a block)
    last_active: float = field(default_factory=time.perf_counter)
    busy: bool = False  # a chunk is queued or running
    waiting: collections.deque = field(default_factory=collections.deque)  # later chunks, in order
    restore: dict | None = None  # a snapshot's state and pending input, put in place by its first chunk
    context: dict = field(default_factory=dict)  # input name -> the last samples of its previous chunk
    chunks: int = 0  # chunks submitted so far (a chunk's number, in errors)


@dataclass(eq=False)
class Request:
    payload: object
    slots_needed: int = 1
    id: int = field(default_factory=lambda: next(_ids))
    arrival: float = field(default_factory=time.perf_counter)
    future: Future = field(default_factory=Future)
    slots: np.ndarray | None = None  # pool slots (tree nodes), when the runner keeps state there
    started: float | None = None  # when it joined the running set
    ticket: int = -1  # its index in the engine's cancellation flags while it runs
    cancelled: bool = False  # set by the future's callback; checked only for rows being batched
    rows: dict = field(default_factory=dict)  # stage name -> row in that stage's persistent batch
    progress: dict = field(default_factory=dict)  # runner-private bookkeeping
    result: object = None
    session: Session | None = None
    end: bool = False  # the last chunk of its session
    snapshot: bool = False  # return the session's state after this chunk (result["snapshot"])
    chunk: int = 0  # its number in its session
    traced: bool = False  # keep the numbers of the steps it takes part in (where the step loop can)
    step_numbers: list | None = None  # those numbers, as in the engine's step log
    error: Exception | None = None  # it left the runner failed (its result could not be made): fails alone

    @property
    def queue_seconds(self) -> float:
        """How long it waited for the running set (so far, while it still waits)."""
        return (self.started if self.started is not None else time.perf_counter()) - self.arrival
