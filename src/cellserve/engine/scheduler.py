"""The engine: one scheduler thread that turns queued requests into batched cell steps.

Policies, all over the same runner and kernels:
  cellular  every step, pick the cell type whose oldest ready node belongs to the oldest request, run up
            to max_batch ready nodes of that type (oldest requests first); requests join between steps
            and leave the moment they finish (BatchMaker's cellular batching).
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

from cellserve.engine.request import EngineFull, EngineStopped, Request
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
                 max_delay_ms: float = 5.0, length_buckets: tuple[int, ...] = (), observer=None):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        self.runner = runner
        self.policy = policy
        self.max_batch = 1 if policy == "none" else int(max_batch)
        self.max_queue = int(max_queue)
        self.max_delay = max_delay_ms / 1000.0
        self.length_buckets = tuple(sorted(length_buckets))
        self.observer = observer  # optional: on_batch(cell_type, size, seconds), on_done(request)
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

    def submit(self, inputs: dict) -> Future:
        """Queue a request; returns a Future with the result. Raises ValueError on bad input and
        EngineFull when the queue is at capacity (nothing is dropped silently)."""
        payload, slots_needed = self.runner.prepare(inputs)
        if slots_needed > self.runner.pool.capacity:
            raise ValueError(f"request needs {slots_needed} state slots; the pool holds {self.runner.pool.capacity}")
        req = Request(payload, slots_needed)
        with self._cv:
            if not self._running:
                raise EngineStopped("engine is not running")
            if len(self._queue) >= self.max_queue:
                self.stats.refused += 1
                raise EngineFull(f"queue full ({self.max_queue} waiting requests); retry later")
            self.stats.submitted += 1
            self._queue.append(req)
            self._cv.notify()
        return req.future

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
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def active(self) -> int:
        return len(self._active)

    # --- scheduler thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while self._running and not self._queue and not self._active:
                    self._cv.wait()
                if not self._running:
                    return
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
            while self._queue and (limit is None or len(self._active) < limit):
                req = self._queue.popleft()
                if req.future.cancelled():
                    self.stats.cancelled += 1
                    continue
                if bucket is not None and self._bucket(req) != bucket:
                    kept.append(req)
                    continue
                slots = self.runner.pool.alloc(req.slots_needed)
                if slots is None:
                    kept.append(req)
                    break
                req.slots, req.started = slots, time.perf_counter()
                self.runner.start(req)
                self._active.append(req)
            kept.extend(self._queue)
            self._queue = kept

    def _bucket(self, req: Request) -> int:
        length = self.runner.length(req.payload)
        return next((i for i, b in enumerate(self.length_buckets) if length <= b), len(self.length_buckets))

    def _cellular_round(self) -> None:
        self._admit()
        self._drop_cancelled()
        oldest = {}
        for req in self._active:  # arrival order: the first hit per type is its oldest ready node
            for cell_type in self.runner.cell_types:
                if cell_type not in oldest and req.has_ready(cell_type):
                    oldest[cell_type] = req.arrival
        if not oldest:
            time.sleep(0)  # only open requests (e.g. sessions waiting for input)
            return
        cell_type = min(oldest, key=oldest.get)
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
        self.stats.batch_sizes[(cell_type, len(nodes) + pad_rows)] += 1
        if self.observer:
            self.observer.on_batch(cell_type, len(nodes) + pad_rows, time.perf_counter() - start)

    def _drop_cancelled(self) -> None:
        with self._cv:
            for req in [r for r in self._active if r.future.cancelled()]:
                self._active.remove(req)
                self.runner.pool.release(req.slots)
                self.stats.cancelled += 1

    def _retire(self, all_at_once: bool = False) -> None:
        """Hand back finished requests at once and free their slots (graph: the whole batch together)."""
        with self._cv:
            finished = [r for r in self._active if r.done]
            if all_at_once and len(finished) != len(self._active):
                return
            for req in finished:
                self._active.remove(req)
                self.runner.pool.release(req.slots)
                if req.future.set_running_or_notify_cancel():
                    req.future.set_result(req.result)
                    self.stats.completed += 1
                else:
                    self.stats.cancelled += 1
                if self.observer:
                    self.observer.on_done(req)

    def _fail(self, req: Request, exc: Exception) -> None:
        if req.slots is not None:
            self.runner.pool.release(req.slots)
            req.slots = None
        if not req.future.done() and req.future.set_running_or_notify_cancel():
            req.future.set_exception(exc)
            self.stats.failed += 1
