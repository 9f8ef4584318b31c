"""The engine: one scheduler thread that turns queued requests into batched cell steps.

Policies, all over the same runner and kernels:
  cellular  every step, run the cell type with the most ready nodes (the fullest batch), up to max_batch
            of them, oldest requests first; but a request that has waited more than max_wait_steps steps
            without progress gets its cell type run first, so no request starves. Requests join between
            steps and leave the moment they finish (BatchMaker's cellular batching). pick="oldest" runs
            the oldest request's cell type instead: lower tree latency at light load, less throughput
            at saturation (measured in the notes of issue 3).
  graph     request-level dynamic batching: wait up to max_delay_ms or max_batch requests (optionally from
            one length bucket), then run every cell type's phase to completion with finished requests as
            padding rows, and answer all requests together (TF-Serving / Triton / Clipper style).
  none      one request at a time, start to finish.
"""

from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from cellserve import kernels
from cellserve.engine.request import EngineFull, EngineStopped, Request, Session, SessionError
from cellserve.engine.runners import Runner

POLICIES = ("cellular", "graph", "none")


@dataclass
class EngineStats:
    submitted: int = 0
    completed: int = 0
    refused: int = 0
    cancelled: int = 0
    failed: int = 0
    steps: int = 0
    batch_sizes: collections.Counter = field(default_factory=collections.Counter)  # (cell type, size) -> count


class Engine:
    def __init__(self, runner: Runner, policy: str = "cellular", max_batch: int = 32, max_queue: int = 1024,
                 max_delay_ms: float = 5.0, length_buckets: tuple[int, ...] = (), observer=None,
                 idle_timeout_s: float = 60.0, max_wait_steps: int = 8, pick: str = "fullest", threads: int = 1):
        """threads: cores each batched step's products are split across (set on the scheduler thread)."""
        if pick not in ("fullest", "oldest"):
            raise ValueError(f"pick must be 'fullest' or 'oldest', got {pick!r}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if max_batch < 1 or max_queue < 1 or threads < 1:
            raise ValueError("max_batch, max_queue and threads must be >= 1")
        self.threads = int(threads)
        self.runner = runner
        self.policy = policy
        self.max_batch = 1 if policy == "none" else int(max_batch)
        self.max_queue = int(max_queue)
        self.max_delay = max_delay_ms / 1000.0
        self.length_buckets = tuple(sorted(length_buckets))
        self.observer = observer  # optional: on_batch(cell_type, size, seconds), on_done(request)
        self.idle_timeout = float(idle_timeout_s)
        self.max_wait_steps = int(max_wait_steps)
        self.pick = pick
        self._sessions: dict[str, Session] = {}
        self._expired: collections.OrderedDict[str, None] = collections.OrderedDict()  # recent, bounded
        self._next_expiry_check = 0.0
        self.stats = EngineStats()
        self._queue: collections.deque[Request] = collections.deque()
        self._active: list[Request] = []  # arrival order
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False

    # --- caller side (any thread) ----------------------------------------------------------------
    def start(self) -> "Engine":
        with self._cv:
            if self._thread is None:
                self._running = True
                self._thread = threading.Thread(target=self._loop, name=f"cellserve-{self.policy}", daemon=True)
                self._thread.start()
        return self

    def submit(self, inputs: dict, sequence_id: str | None = None, sequence_start: bool = False,
               sequence_end: bool = False) -> Future:
        """Queue a request; returns a Future with the result. Raises ValueError on bad input and
        EngineFull when the queue is at capacity (nothing is dropped silently).

        With a sequence_id the request is one chunk of a stateful stream: sequence_start opens the
        session (or restarts an idle one), sequence_end closes it after this chunk; any other chunk
        must name a live session, else SessionError."""
        payload, slots_needed = self.runner.prepare(inputs)
        if slots_needed > self.runner.pool.capacity:
            raise ValueError(f"request needs {slots_needed} state slots; the pool holds {self.runner.pool.capacity}")
        req = Request(payload, slots_needed, end=bool(sequence_end))
        with self._cv:
            if not self._running:
                raise EngineStopped("engine is not running")
            if len(self._queue) >= self.max_queue:
                self.stats.refused += 1
                raise EngineFull(f"queue full ({self.max_queue} waiting requests); retry later")
            if sequence_id is not None:
                req.session = self._session_for(str(sequence_id), sequence_start)
                req.session.queued += 1
                req.session.last_active = time.perf_counter()
            self.stats.submitted += 1
            self._queue.append(req)
            self._cv.notify()
        return req.future

    def _session_for(self, sequence_id: str, start: bool) -> Session:
        session = self._sessions.get(sequence_id)
        if start:
            if session is not None:
                if session.busy or session.queued:
                    raise SessionError(f"sequence {sequence_id!r} has chunks in flight; end it before restarting")
                self._close_session(session)
            session = self._sessions[sequence_id] = Session(sequence_id)
            self._expired.pop(sequence_id, None)
            return session
        if session is None:
            if sequence_id in self._expired:
                raise SessionError(f"sequence {sequence_id!r} expired after {self.idle_timeout:g} s idle; "
                                   "start a new one with sequence_start")
            raise SessionError(f"unknown sequence {sequence_id!r}; its first chunk needs sequence_start")
        return session

    def _close_session(self, session: Session) -> None:
        if session.slots is not None:
            self.runner.pool.release(session.slots)
            session.slots = None
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]

    def _expire_idle_sessions(self) -> None:
        now = time.perf_counter()
        if now < self._next_expiry_check:
            return
        self._next_expiry_check = now + min(1.0, self.idle_timeout / 4)
        with self._cv:
            for session in list(self._sessions.values()):
                if not session.busy and not session.queued and now - session.last_active > self.idle_timeout:
                    self._close_session(session)
                    self._expired[session.id] = None
                    while len(self._expired) > 100_000:
                        self._expired.popitem(last=False)

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    def stop(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop the scheduler. With drain, queued and running requests finish first (up to timeout);
        whatever is left then fails with EngineStopped, so no caller waits forever."""
        deadline = time.perf_counter() + timeout
        if drain:
            while time.perf_counter() < deadline and self.pending():
                time.sleep(0.005)
        with self._cv:
            self._running = False
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.perf_counter()) + 1.0)
        with self._cv:
            for req in list(self._queue) + self._active:
                self._fail(req, EngineStopped("engine stopped before the request finished"))
            self._queue.clear()
            self._active.clear()

    def pending(self) -> int:
        with self._cv:
            return len(self._queue) + len(self._active)

    @property
    def running(self) -> bool:
        return self._running

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def active(self) -> int:
        return len(self._active)

    # --- scheduler thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        kernels.set_threads(self.threads)  # a setting of this thread: every product this engine runs
        while True:
            with self._cv:
                while self._running and not self._queue and not self._active:
                    self._cv.wait(timeout=0.25 if self._sessions else None)
                    if self._sessions:
                        break
                if not self._running:
                    return
            self._expire_idle_sessions()
            with self._cv:
                if not self._queue and not self._active:
                    continue
            try:
                if self.policy == "cellular":
                    self._cellular_round()
                else:
                    self._graph_round()
            except Exception as exc:  # a bug in one batch must not take the engine down
                with self._cv:
                    for req in self._active:
                        self._fail(req, exc)
                    self._active.clear()

    def _admit(self, limit: int | None = None, bucket=None) -> None:
        """Move queued requests into the running set while state slots last (oldest first)."""
        with self._cv:
            kept = collections.deque()
            held: set[int] = set()  # sessions with an earlier chunk still waiting: keep chunk order
            while self._queue and (limit is None or len(self._active) < limit):
                req = self._queue.popleft()
                session = req.session
                if req.future.cancelled():
                    self.stats.cancelled += 1
                    if session is not None:
                        session.queued -= 1
                    continue
                if (bucket is not None and self._bucket(req) != bucket) or (
                        session is not None and (session.busy or id(session) in held)):
                    kept.append(req)
                    if session is not None:
                        held.add(id(session))
                    continue
                if session is not None and session.slots is None:
                    session.slots = self.runner.pool.alloc(1)
                slots = session.slots if session is not None else self.runner.pool.alloc(req.slots_needed)
                if slots is None:
                    kept.append(req)
                    break
                if session is not None:
                    session.busy, session.queued = True, session.queued - 1
                req.slots, req.started, req.last_step = slots, time.perf_counter(), self.stats.steps
                try:
                    self.runner.start(req)
                except Exception as exc:  # fail this request alone, never lose it
                    self._fail(req, exc)
                    continue
                self._active.append(req)
            kept.extend(self._queue)
            self._queue = kept

    def _bucket(self, req: Request) -> int:
        length = self.runner.length(req.payload)
        return next((i for i, b in enumerate(self.length_buckets) if length <= b), len(self.length_buckets))

    def _cellular_round(self) -> None:
        self._admit()
        self._drop_cancelled()
        ready, oldest, starving = collections.Counter(), {}, {}
        step = self.stats.steps
        for req in self._active:  # arrival order: the first hit per type is its oldest (starving) request
            for cell_type in self.runner.cell_types:
                n = len(req.ready.get(cell_type, ()))
                if n:
                    ready[cell_type] += n
                    oldest.setdefault(cell_type, req.arrival)
                    if step - req.last_step > self.max_wait_steps:
                        starving.setdefault(cell_type, req.arrival)
        if not ready:  # e.g. a chunk whose frames all wait for a full block: finished at admission
            self._retire()
            return
        if self.pick == "oldest" or starving:
            first = starving or oldest
            cell_type = min(first, key=first.get)
        else:
            cell_type = max(ready, key=lambda t: min(ready[t], self.max_batch))
        nodes = []
        for req in self._active:
            for node in req.ready.get(cell_type, ()):
                nodes.append((req, node))
                if len(nodes) == self.max_batch:
                    break
            if len(nodes) == self.max_batch:
                break
        self._run(cell_type, nodes, 0)
        self._retire()

    def _graph_round(self) -> None:
        with self._cv:
            if not self._queue:
                return
            first = self._queue[0].arrival
        bucket = self._bucket(self._queue[0]) if self.length_buckets else None
        deadline = first + self.max_delay
        while self.policy == "graph" and time.perf_counter() < deadline:
            with self._cv:
                same = sum(1 for r in self._queue if bucket is None or self._bucket(r) == bucket)
                if same >= self.max_batch or not self._running:
                    break
                self._cv.wait(max(0.0, deadline - time.perf_counter()))
        self._admit(limit=self.max_batch, bucket=bucket)
        batch = list(self._active)
        for cell_type in self.runner.cell_types:
            while True:
                nodes = [(r, n) for r in batch for n in r.ready.get(cell_type, ())]
                if not nodes:
                    break
                pad = sum(1 for r in batch if not r.has_ready(cell_type)) if self.runner.pads else 0
                self._run(cell_type, nodes, pad)
        self._retire(all_at_once=True)

    def _run(self, cell_type: str, nodes: list, pad_rows: int) -> None:
        start = time.perf_counter()
        self.runner.run(cell_type, nodes, pad_rows)
        self.stats.steps += 1
        for req, _ in nodes:
            req.last_step = self.stats.steps
        self.stats.batch_sizes[(cell_type, len(nodes) + pad_rows)] += 1
        if self.observer:
            self.observer.on_batch(cell_type, len(nodes) + pad_rows, time.perf_counter() - start)

    def _drop_cancelled(self) -> None:
        with self._cv:
            for req in [r for r in self._active if r.future.cancelled()]:
                self._active.remove(req)
                self._release(req)
                self.stats.cancelled += 1

    def _retire(self, all_at_once: bool = False) -> None:
        """Hand back finished requests at once and free their slots (graph: the whole batch together)."""
        with self._cv:
            finished = [r for r in self._active if r.done]
            if all_at_once and len(finished) != len(self._active):
                return
            for req in finished:
                self._active.remove(req)
                self._release(req)
                if req.future.set_running_or_notify_cancel():
                    req.future.set_result(req.result)
                    self.stats.completed += 1
                else:
                    self.stats.cancelled += 1
                if self.observer:
                    self.observer.on_done(req)

    def _release(self, req: Request, failed: bool = False) -> None:
        """Free a finished request's slots; a session keeps its slots until its last chunk (or a failure)."""
        session = req.session
        if session is None:
            if req.slots is not None:
                self.runner.pool.release(req.slots)
        else:
            session.busy = False
            session.last_active = time.perf_counter()
            if req.end or failed:
                self._close_session(session)
        req.slots = None

    def _fail(self, req: Request, exc: Exception) -> None:
        if req.slots is not None or req.session is not None:
            self._release(req, failed=True)
        if not req.future.done() and req.future.set_running_or_notify_cancel():
            req.future.set_exception(exc)
            self.stats.failed += 1
