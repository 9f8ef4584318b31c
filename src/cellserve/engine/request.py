"""A request inside the engine, and the errors the engine reports to its callers."""

from __future__ import annotations

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


@dataclass(eq=False)
class Session:
    """A stream's recurrent state, kept in the pool between chunks. Chunks run one at a time, in order."""

    id: str
    slots: np.ndarray | None = None  # allocated when its first chunk is admitted
    buffer: object = None  # runner-private: input not yet consumed (e.g. frames short of a block)
    last_active: float = field(default_factory=time.perf_counter)
    busy: bool = False  # a chunk is in the running set
    queued: int = 0  # chunks waiting in the queue


@dataclass(eq=False)
class Request:
    payload: object
    slots_needed: int = 1
    id: int = field(default_factory=lambda: next(_ids))
    arrival: float = field(default_factory=time.perf_counter)
    future: Future = field(default_factory=Future)
    slots: np.ndarray | None = None
    started: float | None = None  # when it got state slots and joined the running set
    last_step: int = 0  # engine step count when it last made progress (for the starvation bound)
    ready: dict[str, list] = field(default_factory=dict)  # cell type -> nodes ready to run
    progress: dict = field(default_factory=dict)  # runner-private bookkeeping
    done: bool = False
    result: object = None
    session: Session | None = None
    end: bool = False  # the last chunk of its session

    def has_ready(self, cell_type: str) -> bool:
        return bool(self.ready.get(cell_type))
