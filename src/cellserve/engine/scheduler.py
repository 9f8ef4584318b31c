"""The engine: one scheduler thread that turns queued requests into batched cell steps, under a batching
policy (engine/policies.py) over a model family's runner (engine/runner.py).

Per step the engine does O(batch) work, never O(running requests): ready counts come from the runner's
stages, a cancelled request is noticed through a flag (set by its future's callback) when its rows come
up, and finished requests leave through the runner. The time each step spends outside the model's
kernels is measured (stats.overhead_s, the observer's on_step). Sessions (sequence_id) are kept here:
their order, busy flag and expiry; what a session holds in memory is the runner's.
"""

from __future__ import annotations

import collections
import functools
import gc
import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from cellserve import kernels
from cellserve.engine.policies import POLICY_CLASSES, EngineConfig
from cellserve.engine.request import EngineFull, EngineStopped, Request, Session, SessionError, SessionsFull
from cellserve.engine.runner import DONE, NO_ROOM, Runner
from cellserve.engine.steps import StepLog, step_records


@dataclass
class EngineStats:
    submitted: int = 0
    completed: int = 0
    refused: int = 0
    cancelled: int = 0
    failed: int = 0
    steps: int = 0
    step_s: float = 0.0  # wall time of all rounds that ran a step
    overhead_s: float = 0.0  # the part of it outside the model's kernels
    batch_sizes: collections.Counter = field(default_factory=collections.Counter)  # (cell type, size) -> count
    rows_run: int = 0  # rows the kernels computed, padding included
    rows_padded: float = 0.0  # of them, padding: finished requests' rows kept to the batch size (graph
    # policy), or time steps of padding in a whole-graph call counted as rows


STEP_LOG = 2048  # a traced request longer than this many steps keeps its last ones
LANE = ("lane",)  # the cell type of the steps a native front end's lanes run


def calm_gc(threshold: int = 50_000) -> None:
    """Keep the cyclic garbage collector from stalling steps: objects alive now (models, the server)
    move to the permanent generation (gc.freeze), and young collections run every `threshold`
    allocations instead of 700, so a step rarely meets one. Measured on the speller at saturation:
    see README, Garbage collection (`bench serving --python-gc`)."""
    gc.freeze()
    gc.set_threshold(threshold, 20, 100)


class Engine:
    def __init__(self, runner: Runner, policy: str = "cellular", config: EngineConfig | None = None, observer=None,
                 **settings):
        """config: the engine's settings (EngineConfig); without one, `policy` and any EngineConfig fields
        given as keywords make it. observer (optional): on_batch(cell_type, size, seconds) (or on_batches(cell_type,
        sizes, seconds) for a native loop's steps together), on_done(req),
        on_step(overhead per step, seconds, kernel seconds)."""
        config = config or EngineConfig(policy=policy, **settings)
        self.config = config
        self.runner = runner
        self.policy = config.policy
        self._policy = POLICY_CLASSES[config.policy](config)
        self.max_batch = self._policy.max_batch
        self.max_running = max(1, min(self._policy.running, runner.capacity))
        self.max_queue = int(config.max_queue)
        self.length_buckets = tuple(sorted(config.length_buckets))
        self.observer = observer
        # the last steps (end, seconds, cell type, rows, number), on time.perf_counter's clock: a traced
        # request's spans are read from it (server/tracing.py)
        self.step_log = StepLog(STEP_LOG)
        self.idle_timeout = float(config.idle_timeout_s)
        self.max_wait_steps = int(config.max_wait_steps)
        self.pick = config.pick or runner.default_pick
        self.threads = int(config.threads)
        self.max_sessions = int(config.max_sessions) if config.max_sessions else runner.capacity
        self.stats = EngineStats()
        self._sessions: dict[str, Session] = {}
        self._ended: collections.OrderedDict[str, str] = collections.OrderedDict()  # recent ones' reasons, bounded
        self._next_expiry_check = 0.0
        self._queue: collections.deque[Request] = collections.deque()
        self._waiting_chunks = 0  # chunks queued behind a busy session
        self._running: dict[int, Request] = {}
        self.cancel_flags = np.zeros(self.max_running, bool)
        runner.cancel_flags = self.cancel_flags
        self.native = runner.step_loop == "native"  # a native loop: its worker (cellular) or run_steps (graph)
        self.step_loop = runner.step_loop
        self._tickets = list(range(self.max_running - 1, -1, -1))
        self.last_run = dict.fromkeys(runner.cell_types, 0)  # cell type -> the step it last ran
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running_flag = False
        self._waited = 0.0  # seconds the graph policy waited for a fuller batch (not counted as step time)

    # --- caller side (any thread) ----------------------------------------------------------------
    def start(self) -> "Engine":
        with self._cv:
            if self._thread is None:
                if self.config.tune_gc:
                    calm_gc()
                self._running_flag = True
                self._thread = threading.Thread(target=self._loop, name=f"cellserve-{self.policy}", daemon=True)
                self._thread.start()
        return self

    def submit(self, inputs: dict, *sequence, **options) -> Future:
        """Queue a request; returns a Future with its result (the arguments are enqueue's)."""
        return self.enqueue(inputs, *sequence, **options).future

    def enqueue(self, inputs: dict, sequence_id: str | None = None, sequence_start: bool = False,
                sequence_end: bool = False, sequence_snapshot: bool = False,
                sequence_restore: dict | None = None, traced: bool = False) -> Request:
        """Queue a request; returns it (its `future` has the result, `queue_seconds` its wait for the running
        set). Raises ValueError on bad input and EngineFull when the queue is at capacity (nothing is
        dropped silently).

        With a sequence_id the request is one chunk of a stateful stream: sequence_start opens the
        session (or restarts an idle one), sequence_end closes it after this chunk; any other chunk
        must name a live session, else SessionError. A session's chunks run one at a time, in order.
        sequence_snapshot adds the session's state after this chunk to the result ("snapshot");
        sequence_restore (such a snapshot) opens the session with that state instead of zeros. Opening
        a session past max_sessions raises SessionsFull."""
        payload, slots_needed = self.runner.prepare(inputs)
        if slots_needed > self.runner.capacity:
            raise ValueError(f"request needs {slots_needed} state slots; the engine holds {self.runner.capacity}")
        if (sequence_snapshot or sequence_restore is not None) and sequence_id is None:
            raise ValueError("snapshot and restore need a sequence_id")
        if sequence_restore is not None:
            self.runner.check_snapshot(sequence_restore)
        req = Request(payload, slots_needed, end=bool(sequence_end), snapshot=bool(sequence_snapshot), traced=traced)
        with self._cv:
            if not self._running_flag:
                raise EngineStopped("engine is not running")
            opening = sequence_id is None or sequence_start or sequence_restore is not None
            open_session = not opening and str(sequence_id) in self._sessions
            # load refuses only what loses nothing: a new request or a new session's first chunk. A chunk of an
            # open session waits in its session's order (the queue then holds at most one more per session).
            if not open_session and len(self._queue) + self._waiting_chunks >= self.max_queue:
                self.stats.refused += 1
                raise EngineFull(f"queue full ({self.max_queue} waiting requests); retry later")
            if sequence_id is not None:
                req.session = self._session_for(str(sequence_id), sequence_start or sequence_restore is not None)
                req.session.last_active = time.perf_counter()
                req.chunk, req.session.chunks = req.session.chunks, req.session.chunks + 1
                if sequence_restore is not None:
                    req.session.restore = sequence_restore
            self.stats.submitted += 1
            if req.session is not None and req.session.busy:
                req.session.waiting.append(req)
                self._waiting_chunks += 1
            else:
                if req.session is not None:
                    req.session.busy = True
                self._queue.append(req)
                self._queue_changed()
            self._cv.notify()
        # (by weak reference: request -> future -> callback -> request would be a cycle per request, left to
        # the cyclic collector, whose collections stalled a loaded stream server for 20-90 ms)
        req.future.add_done_callback(functools.partial(self._on_cancel, weakref.ref(req)))
        if self.native and self.policy == "cellular":
            # the submitting thread admits it into the worker's next step when the running set has room (one
            # thread hand-over fewer on every request's path); otherwise the engine's thread does, later
            if self.runner.admit_on_submit and len(self._running) < self.max_running and self._running_flag:
                self.admit(self.max_running)
            else:
                self.runner.wake()
        return req

    def _on_cancel(self, ref, future) -> None:
        """A cancelled future flags its request; the engine acts on the flag when the request's rows come
        up (or at admission), so cancelling costs nothing per step."""
        req = ref()
        if req is not None and future.cancelled():
            with self._cv:
                req.cancelled = True
                if req.ticket >= 0:
                    self.cancel_flags[req.ticket] = True

    def _session_for(self, sequence_id: str, start: bool) -> Session:
        session = self._sessions.get(sequence_id)
        if start:
            if session is not None:
                if session.busy:
                    raise SessionError(f"sequence {sequence_id!r} has chunks in flight; end it before restarting")
                self._close_session(session)
            elif len(self._sessions) >= self.max_sessions:
                raise SessionsFull(f"this model holds its maximum of {self.max_sessions} open sequences; end one "
                                   "(sequence_end) or retry later")
            session = self._sessions[sequence_id] = Session(sequence_id)
            self._ended.pop(sequence_id, None)
            return session
        if session is None:
            if sequence_id in self._ended:
                raise SessionError(self._ended[sequence_id])
            raise SessionError(f"unknown sequence {sequence_id!r}; its first chunk needs sequence_start")
        return session

    def _remember(self, sequence_id: str, reason: str) -> None:
        """Why a sequence ended, for its later chunks (the most recent 100,000)."""
        self._ended[sequence_id] = reason
        while len(self._ended) > 100_000:
            self._ended.popitem(last=False)

    def _close_session(self, session: Session) -> None:
        self.runner.close_session(session)
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]

    def _expire_idle_sessions(self) -> None:
        now = time.perf_counter()
        if now < self._next_expiry_check:
            return
        self._next_expiry_check = now + min(1.0, self.idle_timeout / 4)
        with self._cv:
            for session in list(self._sessions.values()):
                if not session.busy and now - session.last_active > self.idle_timeout:
                    self._close_session(session)
                    self._remember(session.id, f"sequence {session.id!r} expired after {self.idle_timeout:g} s idle; "
                                               "start a new one with sequence_start")

    def end_session(self, sequence_id: str, reason: str) -> bool:
        """Close an open session now (its client went away: a WebSocket closed); its later chunks hear
        `reason`. False where it is unknown or still has chunks queued or running."""
        with self._cv:
            session = self._sessions.get(str(sequence_id))
            if session is None or session.busy:
                return False
            self._close_session(session)
            self._remember(session.id, reason)
            return True

    def note_ended(self, sequence_id: str, reason: str) -> None:
        """A session a native lane held ended (its WebSocket closed): later chunks naming it hear `reason`."""
        with self._cv:
            self._remember(str(sequence_id), reason)

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
            self._running_flag = False
            self._cv.notify_all()
        if self.native:
            self.runner.wake()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.perf_counter()) + 1.0)
        with self._cv:
            left = list(self._running.values()) + list(self._queue)
            left += [r for s in self._sessions.values() for r in s.waiting]
            for req in left:
                self._fail(req, EngineStopped("engine stopped before the request finished"))
            self._queue.clear()

    def pending(self) -> int:
        with self._cv:
            return len(self._queue) + len(self._running) + self._waiting_chunks

    @property
    def running(self) -> bool:
        return self._running_flag

    @property
    def queued(self) -> int:
        """Requests waiting for the running set (not counting chunks behind a busy session)."""
        return len(self._queue)

    @property
    def queue_depth(self) -> int:
        return len(self._queue) + self._waiting_chunks

    @property
    def active(self) -> int:
        return len(self._running)

    # --- scheduler thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        kernels.set_threads(self.threads)  # a setting of this thread: every product this engine runs
        if self.native and self.policy == "cellular":
            return self._worker_loop()
        while True:
            with self._cv:
                while self._running_flag and not self._queue and not self._running:
                    self._cv.wait(timeout=0.25 if self._sessions else None)
                    if self._sessions:
                        break
                if not self._running_flag:
                    return
            self._expire_idle_sessions()
            start, kernel, waited = time.perf_counter(), self.runner.kernel_seconds, self._waited
            steps = self.stats.steps
            try:
                self._policy.round(self)
            except Exception as exc:  # a bug in one batch must not take the engine down
                with self._cv:
                    for req in list(self._running.values()):
                        self._fail(req, exc)
            if self.stats.steps > steps:
                seconds = time.perf_counter() - start - (self._waited - waited)  # a batching window is not work
                self._account(seconds, self.runner.kernel_seconds - kernel, self.stats.steps - steps)

    def admit(self, limit: int, bucket=None) -> int:
        """Move queued requests into the running set, oldest first, up to `limit` running (and while the
        runner has room), in one batch. With a bucket (graph), only requests of that length bucket.
        Returns how many joined."""
        batch, cancelled = [], []
        with self._cv:
            room = limit - len(self._running)
            while self._queue and len(batch) < room:
                if bucket is None:
                    req = self._queue.popleft()
                else:
                    req = next((r for r in self._queue if self.bucket(r) == bucket), None)
                    if req is None:
                        break
                    self._queue.remove(req)
                if req.cancelled:
                    cancelled.append(req)
                    continue
                req.ticket = self._tickets.pop()
                self.cancel_flags[req.ticket] = False
                req.started = time.perf_counter()
                self._running[req.id] = req
                batch.append(req)
            self._queue_changed()
        self.retire(cancelled)
        if not batch:
            return 0
        try:
            statuses = self.runner.admit(batch)
        except Exception as exc:  # the runner failed the batch as a whole: fail each, never lose one
            statuses = [exc] * len(batch)
        done = [r for r, status in zip(batch, statuses) if status is DONE]
        back = [r for r, status in zip(batch, statuses) if status is NO_ROOM]
        with self._cv:
            for req, status in zip(batch, statuses):
                if isinstance(status, Exception):
                    self._fail(req, status)
            for req in reversed(back):  # no room: back to the head of the queue, in order
                del self._running[req.id]
                self._tickets.append(req.ticket)
                req.ticket, req.started = -1, None
                self._queue.appendleft(req)
            self._queue_changed()
        self.retire(done)
        return len(batch) - len(back)

    def _queue_changed(self) -> None:
        """Tell a native worker how many requests wait (its pick favours the fullest stage while they cannot
        join)."""
        if self.native:
            self.runner.queued[0] = len(self._queue)

    def run_steps(self, max_rows: int, pad_to: int = 0) -> list[Request]:
        """Every stage to completion in one call of a native loop (run()'s bookkeeping for each step); returns
        the requests that left."""
        left, steps = self.runner.run_steps(max_rows, pad_to)
        self._count_steps(self.runner.cell_types, steps)
        return left

    def _count_steps(self, cell_types, steps: np.ndarray) -> None:
        """run()'s bookkeeping for steps a native loop or lane ran (engine/steps.py's STEP_RECORD; a stage is an
        index into cell_types). A worker hands hundreds at once (every 20 ms while busy), so they are counted
        array by array, not step by step: at one client this was a request's largest cost outside the kernels."""
        if not len(steps):
            return
        stats, first = self.stats, self.stats.steps + 1
        stages, sizes, seconds = steps["stage"], steps["rows"] + steps["padded"], steps["seconds"]
        self.step_log.add(cell_types, steps)
        stats.steps += len(steps)
        stats.rows_run += int(sizes.sum())
        stats.rows_padded += int(steps["padded"].sum())
        stage_list = stages.tolist()
        distinct = set(stage_list)  # (one or two stages; a lane's step is one record of one)
        by_batch = hasattr(self.observer, "on_batches")  # an observer that takes a cell type's steps together
        for stage in distinct:
            cell_type = cell_types[stage]
            mine = slice(None) if len(distinct) == 1 else stages == stage
            self.last_run[cell_type] = first + len(stage_list) - 1 - stage_list[::-1].index(stage)
            counts = np.bincount(sizes[mine])  # (rows per step: small non-negative ints)
            seen = np.flatnonzero(counts)
            stats.batch_sizes.update(dict(zip([(cell_type, size) for size in seen.tolist()], counts[seen].tolist())))
            if by_batch:
                self.observer.on_batches(cell_type, sizes[mine], seconds[mine])
        if self.observer and not by_batch:  # one step at a time, in the order they ran
            for stage, size, took in zip(stage_list, sizes.tolist(), seconds.tolist()):
                self.observer.on_batch(cell_types[stage], size, took)

    def count_lane_steps(self, rows: list, seconds: list, kernel: list, ends: list, latencies,
                         ok: bool = True) -> None:
        """Steps that a native front end's lane (engine/lane.py) ran for this model, outside this engine, one
        list entry each (a lane hands them over together): counted with the engine's own (each message one
        request submitted and answered), so statistics, metrics and the live page show the model whole.
        latencies: each request's seconds from arrival to result."""
        with self._cv:
            first = self.stats.steps + 1
            self._count_steps(LANE, step_records(rows=rows, seconds=seconds, kernel=kernel, end=ends,
                                                 number=range(first, first + len(rows))))
        self._account(sum(seconds), sum(kernel), len(rows))
        self.count_lane_requests(latencies, ok)

    def count_lane_requests(self, latencies, ok: bool = True) -> None:
        """Requests a native front end answered itself (a lane's step, or rows it admitted into this engine's
        loop): submitted and completed (or failed), their latencies observed."""
        with self._cv:
            self.stats.submitted += len(latencies)
            if ok:
                self.stats.completed += len(latencies)
            else:
                self.stats.failed += len(latencies)
        if ok and self.observer and hasattr(self.observer, "on_latencies"):
            self.observer.on_latencies(latencies)

    def _account(self, seconds: float, kernel: float, steps: int) -> None:
        """Wall time of `steps` steps and the part of it outside the model's kernels (the overhead metric)."""
        overhead = max(0.0, seconds - kernel)
        self.stats.step_s += seconds
        self.stats.overhead_s += overhead
        if self.observer and hasattr(self.observer, "on_step"):
            self.observer.on_step(overhead / steps, seconds, kernel)

    def _worker_loop(self) -> None:
        """Cellular batching on a native loop's own thread (engine/steploop.py): its steps never wait for this
        thread or the GIL; this thread admits queued requests (they join at the worker's next step) and
        resolves the futures of those that left. Overhead here is the worker's own time per step outside the
        kernels (its bookkeeping and hand-overs); this thread's work runs beside it."""
        runner = self.runner
        runner.start_worker(self.max_batch, self.pick, self.max_wait_steps, self.max_running, self.threads)
        try:
            while self._running_flag:
                self._expire_idle_sessions()
                if self._queue and len(self._running) < self.max_running:
                    self.admit(self.max_running)
                left, steps = runner.collect(0.25)
                if len(steps):
                    self._count_steps(runner.cell_types, steps)
                    self._account(float(steps["seconds"].sum()), float(steps["kernel"].sum()), len(steps))
                self.retire(left)
        except Exception as exc:  # a bug must not leave callers waiting: fail what runs, stop stepping
            with self._cv:
                for req in list(self._running.values()):
                    self._fail(req, exc)
        finally:
            runner.stop_worker()

    def bucket(self, req: Request) -> int:
        length = self.runner.length(req.payload)
        return next((i for i, b in enumerate(self.length_buckets) if length <= b), len(self.length_buckets))

    def oldest_queued(self) -> Request | None:
        with self._cv:
            return self._queue[0] if self._queue else None

    def wait_for(self, bucket, count: int, deadline: float) -> None:
        """Wait until `count` requests of a length bucket (None: any) are queued, the deadline passes or
        the engine stops: the graph policy's batching window."""
        start = time.perf_counter()
        with self._cv:
            while self._running_flag and time.perf_counter() < deadline:
                if sum(1 for r in self._queue if bucket is None or self.bucket(r) == bucket) >= count:
                    break
                self._cv.wait(max(0.0, deadline - time.perf_counter()))
        self._waited += time.perf_counter() - start

    def run(self, cell_type: str, max_rows: int, pad_to: int) -> list[Request]:
        start = time.perf_counter()
        left = self.runner.step(cell_type, max_rows, pad_to)
        self.stats.steps += 1
        self.last_run[cell_type] = self.stats.steps
        size = max(self.runner.last_rows, pad_to)
        end = time.perf_counter()
        self.step_log.add((cell_type,), step_records(rows=[size], seconds=[end - start], end=[end],
                                                     number=[self.stats.steps]))
        self.stats.batch_sizes[(cell_type, size)] += 1
        self.stats.rows_run += size
        self.stats.rows_padded += size - self.runner.last_rows + self.runner.last_padding
        if self.observer:
            self.observer.on_batch(cell_type, size, end - start)
        return left

    def retire(self, reqs: list[Request]) -> None:
        """Hand back requests that left the runner: a result, or a cancellation; free their tickets. The
        futures are resolved outside the engine's lock (their callbacks run here), so submitters never
        wait for them."""
        if not reqs:
            return
        with self._cv:
            for req in reqs:
                self._running.pop(req.id, None)
                self._release(req, failed=req.error is not None)
        for req in reqs:
            if req.cancelled or not req.future.set_running_or_notify_cancel():
                self.stats.cancelled += 1
            elif req.error is not None:
                req.future.set_exception(req.error)
                self.stats.failed += 1
            else:
                req.future.set_result(req.result)
                self.stats.completed += 1
            if self.observer:
                self.observer.on_done(req)

    def _release(self, req: Request, failed: bool = False) -> None:
        """Free a request's ticket; a session moves on to its next chunk, or closes after its last one."""
        if req.ticket >= 0:
            self._tickets.append(req.ticket)
            req.ticket = -1
        session = req.session
        if session is None:
            return
        session.last_active = time.perf_counter()
        if failed or req.cancelled:  # never continue a session past a gap: its later chunks are refused
            self._break_session(session, req, "failed" if failed else "was cancelled")
            return
        if req.end:
            self._close_session(session)
        if session.waiting:
            nxt = session.waiting.popleft()
            self._waiting_chunks -= 1
            self._queue.appendleft(nxt)  # older than anything queued after it
            self._queue_changed()
            self._cv.notify()
        else:
            session.busy = False

    def _break_session(self, session: Session, req: Request, what: str) -> None:
        reason = (f"sequence {session.id!r} stopped at its chunk {req.chunk}, which {what}: it is never continued "
                  "past a gap; restore it from a snapshot (sequence_restore) or start a new one (sequence_start)")
        self._close_session(session)
        self._remember(session.id, reason)
        later, session.busy = list(session.waiting), False
        session.waiting.clear()
        self._waiting_chunks -= len(later)
        for nxt in later:
            if not nxt.future.done() and nxt.future.set_running_or_notify_cancel():
                nxt.future.set_exception(SessionError(reason))
                self.stats.failed += 1

    def _fail(self, req: Request, exc: Exception) -> None:
        if self._running.pop(req.id, None) is not None:
            try:
                self.runner.drop(req)
            except Exception:  # the runner's state is already broken; the request must still fail
                pass
        if req.session is not None and req in req.session.waiting:
            req.session.waiting.remove(req)
            self._waiting_chunks -= 1
        self._release(req, failed=True)
        if not req.future.done() and req.future.set_running_or_notify_cancel():
            req.future.set_exception(exc)
            self.stats.failed += 1
