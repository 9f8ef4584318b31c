"""What the server does, whatever the wire: the Backend protocol (the Open Inference Protocol operations,
one `infer` entry point among them), and LocalBackend, which answers it from this process's repository
and engines and records each model's statistics. The HTTP app (app.py) and the gRPC service
(grpc_service.py) only convert between their wire and this protocol, like MLServer's REST and gRPC
converters over its DataPlane; the Ray Serve router (ray_serve.py) implements the same protocol across
processes, so both wires work through it too.

Every refusal is a ServiceError with an HTTP status; the gRPC front end maps it to a status code. A bad
request never touches another: infer parses, submits to the engine and waits on its futures.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from concurrent.futures import CancelledError
from typing import Callable, Protocol, Union

from prometheus_client import generate_latest

from cellserve import __version__
from cellserve.engine import EngineFull, EngineStopped
from cellserve.server import tracing
from cellserve.server.live import LiveView
from cellserve.server.metrics import Metrics
from cellserve.server.protocol import InferRequest, InferResponse, ProtocolError
from cellserve.server.repository import Repository

DEFAULT_MAX_BODY_BYTES = 16 * 2**20
EXTENSIONS = ["binary_tensor_data", "sequence", "sequence_snapshot", "model_repository",
              "model_repository(unload_dependents)", "statistics", "model_configuration"]
GRPC_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
              413: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE", 500: "INTERNAL"}
MODEL_CONTROL_MODES = ("none", "explicit")
DEFAULT_PENDING_CHUNKS = 64


class ServiceError(Exception):
    """A refused request: `status` is its HTTP status (400 bad input, 404 unknown model, 503 no capacity)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status

    @property
    def grpc_code(self) -> str:
        return GRPC_CODES.get(self.status, "UNKNOWN")


Parsed = Union[InferRequest, Callable[[], InferRequest]]  # a request, or what parses it (ProtocolError)


class Backend(Protocol):
    """What the wires ask of a server: LocalBackend here, ShardRouter across Ray Serve processes."""

    async def server_metadata(self) -> dict: ...
    async def ready(self) -> bool: ...
    async def model_metadata(self, name: str, version: str | None = None) -> dict: ...
    async def model_ready(self, name: str, version: str | None = None) -> bool: ...
    async def model_config(self, name: str, version: str | None = None) -> dict: ...
    async def statistics(self, name: str | None = None, version: str | None = None) -> dict: ...
    async def metrics_text(self) -> bytes: ...
    async def live(self, window_s: float | None = None) -> dict: ...  # the live page's figures (live.py)
    async def repository_index(self, ready_only: bool = False) -> list[dict]: ...
    async def load(self, name: str) -> None: ...
    async def unload(self, name: str) -> None: ...
    def pending_limit(self, name: str) -> int: ...  # a session's unanswered chunks before a stream waits

    async def infer(self, name: str, request: Parsed, version: str | None = None) -> InferResponse:
        """Run one inference request: a parsed InferRequest, or a function that parses it (then its parsing
        time and failures count in the model's statistics). Raises ServiceError."""


class LocalBackend:
    """Models served by engines in this process. `replica` names the process when several serve
    (Ray Serve shards); it is reported in infer responses and metrics."""

    def __init__(self, repository: Repository, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 replica: int | None = None, model_control: str = "none"):
        """model_control: "none" (Triton's default: the repository is fixed while serving, load and unload
        are refused) or "explicit" (they are allowed)."""
        if model_control not in MODEL_CONTROL_MODES:
            raise ValueError(f"model control mode must be one of {MODEL_CONTROL_MODES}, not {model_control!r}")
        self.repository, self.max_body_bytes, self.replica = repository, max_body_bytes, replica
        self.model_control = model_control
        self.draining = False  # shutting down: not ready, new work refused, accepted work finishes
        self.drain_hooks: list[Callable[[], None]] = []  # what else stops opening sessions then (native lanes)
        self.read_hooks: list[Callable[[], None]] = []  # what hands over figures before they are read (native lanes)
        self.metrics = Metrics()
        self.live_view = LiveView()
        for served in repository.models.values():
            self.metrics.watch(served, self.live_view.watch(served))

    def start(self) -> None:
        self.repository.start()
        self.live_view.start()

    def stop(self) -> None:
        self.live_view.stop()
        self.repository.stop()

    def _model(self, name: str, version: str | None = None):
        served = self.repository.get(name)
        if served is None:
            raise ServiceError(404, f"unknown model {name!r}; this server has {sorted(self.repository.models)}")
        if version not in (None, "", served.version):
            raise ServiceError(404, f"model {name!r} has no version {version!r}; it serves {served.version!r}")
        return served

    # --- metadata -----------------------------------------------------------------------------------
    async def server_metadata(self) -> dict:
        return {"name": "cellserve", "version": __version__, "extensions": EXTENSIONS}

    async def ready(self) -> bool:
        return not self.draining and all(m.engine.running for m in self.repository.models.values())

    def begin_drain(self) -> None:
        self.draining = True
        for hook in self.drain_hooks:
            hook()

    def end_session(self, name: str, sequence_id: str, reason: str) -> bool:
        """A session whose connection closed ends (engine.end_session); False where there is none to end."""
        served = self.repository.get(name)
        return served is not None and served.engine.end_session(sequence_id, reason)

    def pending_limit(self, name: str) -> int:
        served = self.repository.get(name)
        return served.config.max_pending_chunks if served is not None else DEFAULT_PENDING_CHUNKS

    async def model_metadata(self, name: str, version: str | None = None) -> dict:
        return self._model(name, version).metadata()

    async def model_ready(self, name: str, version: str | None = None) -> bool:
        return self._model(name, version).engine.running

    async def model_config(self, name: str, version: str | None = None) -> dict:
        return self._model(name, version).model_config()

    def _read(self) -> None:
        for hook in self.read_hooks:
            hook()

    async def statistics(self, name: str | None = None, version: str | None = None) -> dict:
        served = [self._model(name, version)] if name else list(self.repository.models.values())
        self._read()
        return {"model_stats": [m.stats.triton(m.name, m.version, m.engine.stats.steps) for m in served]}

    async def metrics_text(self) -> bytes:
        self._read()
        return generate_latest(self.metrics.registry)

    async def live(self, window_s: float | None = None) -> dict:
        self._read()
        return self.live_view.snapshot(window_s)

    # --- repository -----------------------------------------------------------------------------------
    async def repository_index(self, ready_only: bool = False) -> list[dict]:
        return self.repository.index(ready_only)

    def _control(self) -> None:
        if self.model_control != "explicit":
            raise ServiceError(403, "model control is off: start the server with --model-control-mode explicit to "
                                    "load and unload models")

    async def load(self, name: str) -> None:
        """(Re)read a model's folder and serve the new version; requests already given to the old one finish
        there, new ones go to the new one."""
        self._control()
        try:
            served, old = await asyncio.get_running_loop().run_in_executor(None, self.repository.load, name)
        except KeyError as exc:
            raise ServiceError(404, str(exc.args[0]))
        except ValueError as exc:
            raise ServiceError(400, f"model {name!r} failed to load: {exc}")
        self.metrics.watch(served, self.live_view.watch(served))
        if old is not None:
            self.repository.retire(old)

    async def unload(self, name: str) -> None:
        self._control()
        try:
            self.repository.retire(self.repository.unload(name))
            self.live_view.forget(name)
        except KeyError as exc:
            raise ServiceError(400, str(exc.args[0]))

    # --- inference ------------------------------------------------------------------------------------
    async def infer(self, name: str, request: Parsed, version: str | None = None) -> InferResponse:
        start = time.perf_counter()
        try:
            req = request() if callable(request) else request
        except ProtocolError as exc:
            self._record_failure(name, start, 400)
            raise ServiceError(400, str(exc))
        try:
            return await self._infer(name, req, version, start)
        except ServiceError as exc:
            self._record_failure(name, start, exc.status)
            raise

    async def _infer(self, name: str, req: InferRequest, version: str | None, start: float) -> InferResponse:
        sub = self._submit(name, req, version)
        try:
            if len(sub.rows) == 1:  # one row needs none of gather's task and callbacks
                results = [await asyncio.wrap_future(sub.rows[0].future)]
            else:
                results = await asyncio.gather(*(asyncio.wrap_future(r.future) for r in sub.rows))
        except asyncio.CancelledError:  # the client went away: free the engine's slots
            _cancel(sub.rows)
            raise
        except (ValueError, EngineFull, EngineStopped) as exc:
            _cancel(sub.rows)
            raise _refusal(exc)
        return self._respond(sub, results, start)

    def infer_then(self, name: str, parse: Callable[[], InferRequest], version: str | None,
                   done: Callable[[InferResponse | None, BaseException | None], None],
                   defer: Callable | None = None) -> Submission | None:
        """infer without an event loop, for the native front ends: parse and submit on this thread, then
        done(response, None) or done(None, error) (error a ServiceError, or what the engine raised) on the
        thread that finishes the request's last row, or through defer(function, *args) where the caller
        runs it (the engine's thread then only hands it over). Returns the submission (whose rows a client
        that goes away cancels), or None when it was refused at once (done has been called)."""
        start = time.perf_counter()
        try:
            try:
                req = parse()
            except ProtocolError as exc:
                raise ServiceError(400, str(exc))
            sub = self._submit(name, req, version)
        except ServiceError as exc:
            self._record_failure(name, start, exc.status)
            done(None, exc)
            return None

        def finished(results, error):
            if error is None:
                try:
                    response = self._respond(sub, results, start)
                except ServiceError as exc:
                    error = exc
                else:
                    return done(response, None)
            if isinstance(error, (ValueError, EngineFull, EngineStopped)):
                error = _refusal(error)
            self._record_failure(name, start, getattr(error, "status", 500))
            done(None, error)

        sub.when_done(finished if defer is None else functools.partial(defer, finished))
        return sub

    def _submit(self, name: str, req: InferRequest, version: str | None) -> "Submission":
        """Checks a request against its model and queues its rows; ServiceError when refused."""
        served = self._model(name, version)
        try:
            sequence = _sequence_parameters(req.parameters, served.stateful)
            if self.draining and (not sequence or sequence["sequence_start"] or "sequence_restore" in sequence):
                raise ServiceError(503, "the server is shutting down: it finishes open sessions but takes no new "
                                        "work; retry on another replica")
            if sequence.get("sequence_restore"):
                sequence["sequence_restore"] = served.restore_of(req.inputs)
            inputs = served.requests(req.inputs)
        except ValueError as exc:  # ProtocolError, or a snapshot that is not this model's
            raise ServiceError(400, str(exc))
        chunks = len(inputs)
        if sequence and chunks > 1 and getattr(served.engine.runner, "merges_chunks", False):
            inputs = [inputs]  # a session's message of N chunks: one request of their N steps, in order
        parsed = time.perf_counter()
        traced = tracing.traced()
        for attempt in (0, 1):
            submitted = []
            try:
                for i, item in enumerate(inputs):
                    submitted.append(served.engine.enqueue(item, **_chunk_parameters(sequence, i, len(inputs)),
                                                           traced=traced))
                return Submission(served, req, sequence, submitted, parsed, traced, chunks)
            except (ValueError, EngineFull) as exc:  # bad values the model rejects, unknown/expired sessions
                _cancel(submitted)
                raise _refusal(exc)
            except EngineStopped as exc:
                current = self.repository.get(name)
                if attempt == 0 and not submitted and current is not None and current is not served:
                    served = current  # reloaded between lookup and submit: the new version takes it
                    continue
                raise ServiceError(503, str(exc))

    def _respond(self, sub: "Submission", results: list, start: float) -> InferResponse:
        """A submission's response from its rows' results, recorded in the model's statistics."""
        served, req, submitted, parsed = sub.served, sub.request, sub.rows, sub.parsed
        done = time.perf_counter()
        results = [r for result in results for r in (result if isinstance(result, list) else (result,))]
        outputs, parameters = served.outputs_of(results)
        wanted = list(req.outputs) or list(outputs)
        unknown = set(wanted) - set(outputs)
        if unknown:
            raise ServiceError(400, f"unknown output(s) {sorted(unknown)}; this model has {sorted(outputs)}")
        if sub.sequence:
            parameters["sequence_id"] = sub.sequence["sequence_id"]
        if self.replica is not None:
            parameters["replica"] = self.replica
        queue = max((r.queue_seconds for r in submitted), default=0.0)  # the longest of its rows' waits
        now = time.perf_counter()
        served.stats.record(True, now - start, parse=parsed - start, queue=queue, infer=done - parsed - queue,
                            output=now - done, rows=sub.chunks)
        self.metrics.requests.labels(served.name, "success").inc()
        timing = {"rows": sub.chunks, "parse_s": parsed - start, "queue_s": queue,
                  "compute_s": done - parsed - queue}
        if sub.traced:  # marks for the request's spans, and its steps
            first = min((r.started for r in submitted if r.started is not None), default=parsed)
            timing.update(clock_offset=time.time() - time.perf_counter(), parsed_at=parsed, started_at=parsed + queue,
                          done_at=done, steps=tracing.request_steps(served.engine.step_log, submitted, first, done))
        return InferResponse(served.name, served.version, req.id, {k: outputs[k] for k in wanted}, parameters, timing)

    def _record_failure(self, name: str, start: float, status: int) -> None:
        served = self.repository.get(name)
        if served is not None:
            served.stats.record(False, time.perf_counter() - start)
        self.metrics.requests.labels(name, f"http_{status}").inc()


def _sequence_parameters(parameters: dict, stateful: bool) -> dict:
    """sequence_id / sequence_start / sequence_end / sequence_snapshot / sequence_restore, checked; {} for a
    stateless request."""
    if "sequence_id" not in parameters:
        if any(parameters.get(k) for k in ("sequence_start", "sequence_end", "sequence_snapshot", "sequence_restore")):
            raise ProtocolError("sequence parameters need a sequence_id")
        return {}
    if not stateful:
        raise ProtocolError("this model is stateless; it does not take sequence parameters")
    sid = parameters["sequence_id"]
    if isinstance(sid, bool) or not isinstance(sid, (int, str)) or sid in ("", 0):
        raise ProtocolError("sequence_id must be a non-zero integer or a non-empty string")
    flags = {}
    for key in ("sequence_start", "sequence_end", "sequence_snapshot", "sequence_restore"):
        value = parameters.get(key, False)
        if not isinstance(value, bool):
            raise ProtocolError(f"{key} must be true or false")
        flags[key] = value
    if flags["sequence_start"] and flags["sequence_restore"]:
        raise ProtocolError("sequence_start and sequence_restore both open a sequence: give one")
    if not flags.pop("sequence_restore"):
        return {"sequence_id": str(sid), **flags}
    return {"sequence_id": str(sid), **flags, "sequence_restore": True}


def _chunk_parameters(sequence: dict, i: int, n: int) -> dict:
    """A session request's rows are consecutive chunks of its stream, run in order: the first opens (or
    restores) the session, the last closes it or takes its snapshot."""
    if not sequence or n == 1:
        return sequence
    chunk = dict(sequence)
    if i > 0:
        chunk["sequence_start"] = False
        chunk.pop("sequence_restore", None)
    if i < n - 1:
        chunk["sequence_end"] = chunk["sequence_snapshot"] = False
    return chunk


class Submission:
    """A request's rows in the engine: what _respond needs once they finish, and when_done for callers
    without an event loop."""

    def __init__(self, served, request: InferRequest, sequence: dict, rows: list, parsed: float, traced: bool,
                 chunks: int):
        self.served, self.request, self.sequence, self.rows = served, request, sequence, rows
        self.parsed, self.traced, self.chunks = parsed, traced, chunks  # chunks: the request's rows

    def when_done(self, callback: Callable[[list | None, BaseException | None], None]) -> None:
        """callback(results, None) once every row finished, or callback(None, error) at the first that
        failed or was cancelled (the others are cancelled then), on the thread that finished it."""
        if not self.rows:
            return callback([], None)
        left, lock, called = [len(self.rows)], threading.Lock(), [False]

        def one(future):
            with lock:
                if called[0]:
                    return
                left[0] -= 1
                error = CancelledError() if future.cancelled() else future.exception()
                if error is None and left[0]:
                    return
                called[0] = True
            try:
                if error is not None:
                    _cancel(self.rows)
                    callback(None, error)
                else:
                    callback([r.future.result() for r in self.rows], None)
            finally:  # the rows' futures hold this callback: no cycle back to them once it ran
                self.rows = ()

        for row in self.rows:
            row.future.add_done_callback(one)

    def cancel(self) -> None:
        _cancel(self.rows)


def _refusal(exc: Exception) -> ServiceError:
    """The engine's refusals as the protocol's: bad values or an unknown session 400, no capacity 503."""
    return ServiceError(400 if isinstance(exc, ValueError) else 503, str(exc))


def _cancel(requests) -> None:
    for r in requests:
        r.future.cancel()
