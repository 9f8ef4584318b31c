"""The native gRPC front end's Python face: grpc++ (grpc_front.cpp) owns the sockets, HTTP/2 and the
protobuf framing; one dispatcher thread here takes every message that arrived meanwhile in one call and
answers it.

- Inference (ModelInfer, ModelStreamInfer) runs without the event loop: the request is parsed, checked and
  queued on the dispatcher thread (LocalBackend.infer_then), and answered from the thread that finishes its
  last row. No asyncio task, future wrapper or thread hop per message.
- Everything else (health, metadata, config, repository, statistics) and inference through a backend that
  only speaks asyncio (the Ray router), or with tracing on, goes to today's servicer (grpc_service.py) on
  the event loop, so each has one implementation and the same messages and status codes.

Streams: a stream's messages are submitted in arrival order on the dispatcher thread (a session's chunks
keep theirs) and answered as they finish; while one of its sessions has more than max_pending_chunks
unanswered, grpc++ stops reading that stream (the client's sends wait), so load never refuses a chunk of an
open session.

Lanes: the session messages of a streaming imported graph (engine/lane.py says which qualify) never reach
this dispatcher. lanes.cpp parses and checks them, holds their sessions, batches them and calls the model's
StreamStep once per step (_LaneStep: arrays in and out, and the step's statistics, metrics and access
lines in one go). Nor do the stateless requests of a token model on a native step loop (the speller: its
family's lane_spec): token_lanes.cpp admits them into the engine's running loop and answers them as they
leave it (_TokenLaneRecord: their statistics once per step). Lanes are off where a request must pass through
Python: restricted API groups, tracing, model control (a model may be replaced), the Ray router, or
CELLSERVE_STREAM_LANES=0.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import threading
import time
from concurrent.futures import CancelledError

import grpc
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb

import numpy as np

from cellserve.engine.lane import StreamStep
from cellserve.server import tracing
from cellserve.server.auth import GRPC_GROUPS, refusal
from cellserve.server.backend import GRPC_CODES, LocalBackend, ServiceError, _sequence_parameters
from cellserve.server.protocol import (HEADER_LENGTH, InferResponse, ProtocolError, build_response,
                                       parse_infer_request)
from cellserve.server.websocket import in_session
from cellserve.server.snapshot import to_text
from cellserve.server.grpc_service import (InferenceServicer, _failed, _sequence_id, decode_request, encode_response,
                                           tls_pem)
from cellserve.server import telemetry
from cellserve.server.telemetry import ACCESS, access_line, internal_error, new_request_id

try:
    from cellserve.server.native import _grpc_front
except ImportError:  # built without grpc++: the Python front end serves
    _grpc_front = None

AVAILABLE = _grpc_front is not None
log = logging.getLogger("cellserve.server")
LANE_WORKERS = min(os.cpu_count() or 1, 8)  # a lane's step threads: one per core (steps run outside the GIL)
CODES = {name: code.value[0] for name, code in grpc.StatusCode.__members__.items()}
REQUESTS = {"ServerLive": pb.ServerLiveRequest, "ServerReady": pb.ServerReadyRequest,
            "ModelReady": pb.ModelReadyRequest, "ServerMetadata": pb.ServerMetadataRequest,
            "ModelMetadata": pb.ModelMetadataRequest, "ModelConfig": pb.ModelConfigRequest,
            "ModelStatistics": pb.ModelStatisticsRequest, "RepositoryIndex": pb.RepositoryIndexRequest,
            "RepositoryModelLoad": pb.RepositoryModelLoadRequest,
            "RepositoryModelUnload": pb.RepositoryModelUnloadRequest}  # the control calls


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


class _Context:
    """What the servicer's handlers use of grpc's context: the call's metadata, and abort."""

    def __init__(self, metadata: dict):
        self.metadata = metadata

    def invocation_metadata(self):
        return tuple(self.metadata.items())

    async def abort(self, code, details):
        raise _Abort(code, details)


class _Stream:
    """One ModelStreamInfer call: its metadata, its unanswered messages, and whether it waits."""

    def __init__(self, metadata: dict):
        self.metadata = {k: v for k, v in metadata.items() if k != "x-request-id"}  # each message has its id
        self.pending: dict = {}  # sequence id -> [chunks unanswered, its model's max_pending_chunks]
        self.submissions: set = set()
        self.unanswered = 0
        self.closed = self.paused = False


class NativeGrpcServer:
    """Serves `inference.GRPCInferenceService` through grpc++; `await stop(grace)` drains it as grpc.aio's
    server does (no new calls; calls under way get `grace` seconds)."""

    def __init__(self, backend, address: str | None, max_message_bytes: int, restricted=(), tls: dict | None = None):
        """address None: no gRPC port (the lanes and the native HTTP front end only)."""
        self.backend = backend  # () -> the Backend
        self.servicer = InferenceServicer(backend)
        self.restricted = list(restricted)
        pem = {k: v.decode() for k, v in tls_pem(tls).items() if v is not None} if tls else {}
        self.front = _grpc_front.Front(address, max_message_bytes, **pem)
        self.port = self.front.port
        self.loop = asyncio.get_running_loop()
        self.lock = threading.Lock()  # stream state: the dispatcher and the engine's threads both touch it
        self.streams: dict[int, _Stream] = {}
        self.unary: dict[int, object] = {}  # call -> its submission, cancelled when the client goes away
        self.finished: collections.deque = collections.deque()  # (function, args) handed over by the engine
        self.lanes = self._add_lanes(backend())
        self.thread = threading.Thread(target=self._serve, name="cellserve-grpc", daemon=True)
        self.thread.start()

    def _add_lanes(self, backend) -> list[str]:
        """A lane for every model that qualifies, where nothing asks for Python per request; their names."""
        if (not getattr(_grpc_front, "LANES", 0) or os.environ.get("CELLSERVE_STREAM_LANES", "1") == "0"
                or self.restricted or tracing.TRACER is not None or not isinstance(backend, LocalBackend)
                or backend.model_control != "none"):
            return []
        names = []
        for served in backend.repository.models.values():
            engine = served.engine
            spec = served.family.lane_spec(engine.runner) if engine.native and engine.policy == "cellular" else None
            if spec is not None:
                spec["max_inflight"] = engine.max_running + engine.max_queue
                self.front.add_token_lane(served.name, served.version, engine.runner.loop, spec,
                                          _TokenLaneRecord(backend, served))
                names.append(served.name)
                continue
            step = StreamStep.of(served.family, served.engine.runner, served.config.policy)
            if isinstance(step, str):
                log.debug("model %s: no native stream lane (%s)", served.name, step)
                continue
            config = served.config
            meta = served.metadata()  # the WebSocket route's default input and output (websocket.py)
            first_input = next(t["name"] for t in meta["inputs"] if t["name"] != "sequence_snapshot")
            first_output = next(t["name"] for t in meta["outputs"] if t["name"] != "sequence_snapshot")
            websocket = first_input == step.input and first_output == step.outputs[0]["name"]
            self.front.add_lane(served.name, served.version, step.input, step.samples, step.context, step.width,
                                config.max_batch, config.max_sessions or served.engine.runner.capacity,
                                config.max_pending_chunks, float(config.idle_timeout_s),
                                [(o["name"], o["rest"]) for o in step.outputs],
                                _LaneStep(backend, served, step, self._defer), LANE_WORKERS, websocket)
            served.lane_sessions = functools.partial(self.front.lane_sessions, served.name)
            names.append(served.name)
        if names:
            backend.drain_hooks.append(self.front.drain)
            backend.read_hooks.append(self.front.flush_lanes)
            log.info("native lanes (their requests answered without Python): %s", ", ".join(names))
        return names

    def serve_http(self, host: str, port: int, upstream: str, max_body_bytes: int, tls: dict | None) -> int:
        """The native HTTP front end on host:port (http_front.cpp), passing what its lanes do not answer to the
        app's uvicorn on the Unix socket `upstream`; the bound port."""
        pem = {k: v.decode() for k, v in tls_pem(tls).items() if v is not None} if tls else {}
        bound = self.front.serve_http(host, port, upstream, max_body_bytes, telemetry.ID_PREFIX, **pem)
        target = self.backend()
        if hasattr(target, "drain_hooks"):  # SIGTERM: no new connections, as uvicorn's own port
            target.drain_hooks.append(self.front.http_drain)
        return bound

    async def stop(self, grace: float | None = None) -> None:
        await self.loop.run_in_executor(None, self.front.shutdown, float(grace or 0.0))
        await self.loop.run_in_executor(None, self.thread.join)

    # --- the dispatcher thread ------------------------------------------------------------------------
    def _serve(self) -> None:
        while (batch := self.front.take(0.5)) is not None:
            for call, kind, method, payload, metadata in batch:
                try:
                    self._dispatch(call, kind, method, payload, metadata)
                except Exception as exc:  # noqa: BLE001 (one call's failure never stops the others)
                    log.exception("gRPC call %d failed", call)
                    self.front.fail(call, CODES["INTERNAL"], f"internal error ({type(exc).__name__})")
            self._answer_finished()

    def _defer(self, function, *args) -> None:
        """Called on a step loop's thread (the engine's, a lane's) when requests finish: their responses (or
        access lines) are made and written on this front's dispatcher thread, so the loop goes back to
        stepping at once."""
        self.finished.append((function, args))
        if len(self.finished) == 1:
            self.front.wake()

    def _answer_finished(self) -> None:
        while self.finished:
            function, args = self.finished.popleft()
            try:
                function(*args)
            except Exception:  # noqa: BLE001
                log.exception("answering a finished request failed")

    def _dispatch(self, call: int, kind: int, method: str, payload: bytes, metadata: tuple) -> None:
        if kind == _grpc_front.WOKEN:
            return None
        if kind == _grpc_front.RECORDS:
            return self.front.flush_lanes()
        if kind == _grpc_front.CALL_ENDED:
            return self._ended(call)
        if kind == _grpc_front.STREAM_CLOSED:
            return self._closed(call)
        if kind == _grpc_front.STREAM_MESSAGE and not method:  # a stream's later message
            stream = self.streams.get(call)
            return self._stream_message(call, stream, payload) if stream is not None else None
        name = method.rsplit("/", 1)[-1]
        meta = {k.lower(): v.decode("latin-1") for k, v in metadata if not k.endswith("-bin")}
        refused = refusal(self.restricted, GRPC_GROUPS.get(name), meta)
        if refused is not None:
            return self.front.fail(call, CODES[GRPC_CODES[refused[0]]], refused[1])
        if kind == _grpc_front.STREAM_MESSAGE:
            self.streams[call] = stream = _Stream(meta)
            return self._stream_message(call, stream, payload)
        if name == "ModelInfer":
            return self._unary_infer(call, payload, meta)
        if name not in REQUESTS:
            return self.front.fail(call, CODES["UNIMPLEMENTED"], f"method {method!r} is not served here")
        asyncio.run_coroutine_threadsafe(self._control(call, name, payload, meta), self.loop)

    async def _control(self, call: int, name: str, payload: bytes, meta: dict) -> None:
        """A call for today's servicer, on the event loop (one implementation for both front ends)."""
        try:
            request = REQUESTS[name].FromString(payload)
            response = await getattr(self.servicer, name)(request, _Context(meta))
            self.front.reply(call, response.SerializeToString())
        except DecodeError as exc:
            self.front.fail(call, CODES["INVALID_ARGUMENT"], f"malformed {REQUESTS[name].__name__}: {exc}")
        except _Abort as exc:
            self.front.fail(call, exc.code.value[0], exc.details)
        except Exception as exc:  # noqa: BLE001
            log.exception("gRPC %s failed", name)
            self.front.fail(call, CODES["INTERNAL"], f"internal error ({type(exc).__name__})")

    # --- inference ------------------------------------------------------------------------------------
    def _parsed(self, payload: bytes, answer) -> pb.ModelInferRequest | None:
        try:
            return pb.ModelInferRequest.FromString(payload)
        except DecodeError as exc:
            answer(None, ServiceError(400, f"malformed ModelInferRequest: {exc}"), pb.ModelInferRequest())
            return None

    def _infer(self, request: pb.ModelInferRequest, meta: dict, answer) -> object | None:
        """Check and submit one request; answer(response message or None, ServiceError or None, request)
        comes once it is done. Returns its submission (to cancel), if any."""
        if tracing.TRACER is not None or not hasattr(self.backend(), "infer_then"):  # the servicer's path
            async def on_loop():
                try:
                    answer(await self.servicer._infer(request, meta), None, request)
                except ServiceError as exc:
                    answer(None, exc, request)
                except Exception as exc:  # noqa: BLE001
                    answer(None, internal_error(request.id or new_request_id(), request.model_name, "grpc", exc),
                           request)
            asyncio.run_coroutine_threadsafe(on_loop(), self.loop)
            return None
        start, name = time.perf_counter(), request.model_name
        request_id = meta.get("x-request-id") or request.id

        def done(response, error):
            rid = request_id or (response.id if response is not None else None) or new_request_id()
            message = None
            if error is None:
                try:
                    message = encode_response(response)
                except Exception as exc:  # noqa: BLE001
                    error = exc
            if isinstance(error, CancelledError):
                error = ServiceError(499, "the client went away")
            elif error is not None and not isinstance(error, ServiceError):
                error = internal_error(rid, name, "grpc", error)
            if ACCESS.isEnabledFor(logging.INFO):
                access_line(rid, name, "grpc", 200 if error is None else error.status, time.perf_counter() - start,
                            response.timing if response is not None else {})
            answer(message, error, request)

        return self.backend().infer_then(name, lambda: decode_request(request), request.model_version or None, done,
                                         self._defer)

    def _unary_infer(self, call: int, payload: bytes, meta: dict) -> None:
        def answer(message, error, request):
            if error is None:
                self.front.reply(call, message.SerializeToString())
            else:
                self.front.fail(call, CODES[error.grpc_code], str(error))

        request = self._parsed(payload, answer)
        sub = self._infer(request, meta, answer) if request is not None else None
        if sub is not None:
            self.unary[call] = sub  # (_ended drops it, and cancels it if the client left first)

    def _stream_message(self, call: int, stream: _Stream, payload: bytes) -> None:
        sid, held = None, []

        def answer(message, error, request):
            if error is None:
                out = pb.ModelStreamInferResponse(infer_response=message)
            else:
                out = pb.ModelStreamInferResponse(error_message=str(error), infer_response=_failed(request))
            self.front.reply(call, out.SerializeToString(), False)
            with self.lock:
                stream.unanswered -= 1
                if held:
                    stream.submissions.discard(held[0])
                if sid is not None:
                    count = stream.pending[sid]
                    count[0] -= 1
                    if not count[0]:
                        del stream.pending[sid]
                if stream.paused and all(n <= limit for n, limit in stream.pending.values()):
                    stream.paused = False
                    self.front.resume(call)
                finish = stream.closed and not stream.unanswered
            if finish:
                self.front.finish(call)

        with self.lock:
            stream.unanswered += 1
        request = self._parsed(payload, answer)
        if request is None:
            return
        sid = _sequence_id(request)
        if sid is not None:
            with self.lock:
                count = stream.pending.get(sid)
                if count is None:
                    count = stream.pending[sid] = [0, self.backend().pending_limit(request.model_name)]
                count[0] += 1
        sub = self._infer(request, stream.metadata, answer)
        with self.lock:
            if sub is not None and not all(r.future.done() for r in sub.rows):
                held.append(sub)
                stream.submissions.add(sub)
            count = stream.pending.get(sid) if sid is not None else None
            if count is not None and count[0] > count[1] and not stream.paused:
                stream.paused = True
                self.front.pause(call)

    def _closed(self, call: int) -> None:
        stream = self.streams.get(call)
        if stream is None:
            return self.front.finish(call)
        with self.lock:
            stream.closed = True
            finish = not stream.unanswered
        if finish:
            self.front.finish(call)

    def _ended(self, call: int) -> None:
        """The call is over (answered, failed, or the client went away): free what it still holds."""
        sub = self.unary.pop(call, None)
        if sub is not None:
            sub.cancel()
        stream = self.streams.pop(call, None)
        if stream is not None:
            with self.lock:
                left = list(stream.submissions)
            for sub in left:
                sub.cancel()


class _LaneStep:
    """A model's StreamStep as lanes.cpp calls it, once per step: the step's arrays as bytes in, arrays out.
    Its statistics and metrics are recorded together, at most every RECORD_EVERY_S and before they are read
    (LocalBackend.read_hooks): at one client, counting each step as it ran cost the lane's thread a fifth of
    its time. Its access lines, one a message, are written on the front's dispatcher thread (`defer`): this is
    the lane's step loop."""

    RECORD_EVERY_S = 0.02

    def __init__(self, backend: LocalBackend, served, step: StreamStep, defer):
        self.backend, self.served, self.step, self.defer = backend, served, step, defer
        self.success = backend.metrics.requests.labels(served.name, "success")
        self.failure = backend.metrics.requests.labels(served.name, "http_500")
        self._lock = threading.Lock()  # the lane's thread adds, a reader of statistics may flush meanwhile
        self._done: list = []  # (requests, seconds, kernel, end, latencies, queued, chunks) per step
        self._recorded_at = 0.0
        backend.read_hooks.append(self.flush)

    def __call__(self, x, counts, state, queued, n, most, row, snapshot_rows, ids, protocols):
        start, served = time.perf_counter(), self.served
        x = np.frombuffer(x, np.float32).reshape(n, most, row)
        counts = np.frombuffer(counts, np.int32)
        state = np.frombuffer(state, np.float32).reshape(n, self.step.width)
        queued = np.frombuffer(queued, np.float64)
        try:
            outputs, final, kernel = self.step(x, counts, state)
            snapshots = [None] * n
            for i in snapshot_rows:
                snapshot = self.step.snapshot(x[i], int(counts[i]), final[i])
                snapshots[i] = to_text(served.name, served.architecture, snapshot)
        except Exception:
            log.exception("model %s: a native lane's step failed (%d requests)", served.name, n)
            seconds = time.perf_counter() - start
            self.flush()
            served.stats.record(False, float(queued.sum()) + n * seconds, requests=n)
            self.failure.inc(n)
            served.engine.count_lane_steps([n], [seconds], [0.0], [time.perf_counter()], queued + seconds, ok=False)
            raise
        end = time.perf_counter()
        seconds = end - start
        with self._lock:
            self._done.append((n, seconds, kernel, end, queued + seconds, float(queued.sum()), int(counts.sum())))
        if end - self._recorded_at >= self.RECORD_EVERY_S:
            self.flush()
        if ACCESS.isEnabledFor(logging.INFO):
            self.defer(self._access_lines, ids, queued.tolist(), counts.tolist(), protocols, seconds)
        return outputs, final, snapshots

    def flush(self) -> None:
        """The steps done since the last call, to the model's statistics and metrics."""
        with self._lock:
            done, self._done = self._done, []
            self._recorded_at = time.perf_counter()
        if not done:
            return
        requests, seconds, kernel, ends, latencies, queued, chunks = zip(*done)
        n, served = sum(requests), self.served
        infer = sum(r * s for r, s in zip(requests, seconds))
        served.stats.record(True, sum(queued) + infer, queue=sum(queued), infer=infer, rows=sum(chunks),
                            requests=n)
        self.success.inc(n)
        served.engine.count_lane_steps(list(requests), list(seconds), list(kernel), list(ends),
                                       np.concatenate(latencies))

    def _access_lines(self, ids: list, waits: list, counts: list, protocols: list, seconds: float) -> None:
        for rid, wait, chunks, protocol in zip(ids, waits, counts, protocols):
            access_line(rid or new_request_id(), self.served.name, protocol, 200, wait + seconds,
                        {"rows": chunks, "parse_s": 0.0, "queue_s": wait, "compute_s": seconds})

    def refused(self, statuses: list[int], ids: list[str], protocols: list[str]) -> None:
        """Requests the lane (or a native WebSocket) refused since its last step (sessions full, draining, a
        busy restart, a malformed message), with the HTTP statuses the Python path gives them: counted and
        logged as its failures are."""
        for status, count in collections.Counter(statuses).items():
            self.served.stats.record(False, 0.0, requests=count)
            self.backend.metrics.requests.labels(self.served.name, f"http_{status}").inc(count)
        if ACCESS.isEnabledFor(logging.INFO):
            for status, rid, protocol in zip(statuses, ids, protocols):
                access_line(rid or new_request_id(), self.served.name, protocol, status, 0.0, {})

    def closed(self, sids: list[str]) -> None:
        """Sessions whose native WebSocket closed: a later message naming one hears why, as on the Python
        front end (websocket.py)."""
        for sid in sids:
            self.served.engine.note_ended(sid, f"sequence {sid!r} ended when its WebSocket closed")

    # A native WebSocket's text messages (websocket_front.cpp): read and answered here, one call each way, so
    # that they are taken and worded exactly as the Python front end's (binary messages never come here).
    def read_text(self, text: bytes, sid: str, start: bool):
        """A JSON request on session `sid`: (samples bytes, chunks, id, wanted outputs, snapshot, request) for
        the lane, or the error's message."""
        try:
            req = in_session(parse_infer_request(text, None), sid, start)
            sequence = _sequence_parameters(req.parameters, True)
            self.served.requests(req.inputs)  # the model's own checks and messages
            name = self.step.input
            if set(req.inputs) != {name}:
                raise ProtocolError(f"a stream message carries input {name!r} only, got {sorted(req.inputs)}")
            samples = np.ascontiguousarray(req.inputs[name], np.float32)
            if samples.ndim != 2 or samples.shape[1] != self.step.samples or samples.shape[0] < 1:
                raise ProtocolError(f"input {name!r} must have shape [chunks, {self.step.samples}], got "
                                    f"{list(samples.shape)}")
            outputs = [o["name"] for o in self.step.outputs] + ["sequence_snapshot"] * bool(sequence.get(
                "sequence_snapshot"))
            unknown = set(req.outputs) - set(outputs)
            if unknown:
                raise ProtocolError(f"unknown output(s) {sorted(unknown)}; this model has {sorted(outputs)}")
        except ValueError as exc:
            return str(exc)
        return (samples.tobytes(), samples.shape[0], req.id or "", list(req.outputs),
                bool(sequence.get("sequence_snapshot")), req)

    def answer_text(self, req, sid: str, chunks: int, names: list[str], raws: list[bytes]):
        """The JSON answer (or the binary extension's body) to a text message: (bytes, is_text)."""
        rests = {o["name"]: o["rest"] for o in self.step.outputs}
        outputs = {name: np.array([raw], dtype=object) if name == "sequence_snapshot"
                   else np.frombuffer(raw, np.float32).reshape(chunks, *rests[name])
                   for name, raw in zip(names, raws)}
        parameters = {"frames_pending": 0} if chunks == 1 else {}
        parameters["sequence_id"] = sid
        served = self.served
        content, headers = build_response(InferResponse(served.name, served.version, req.id, outputs, parameters),
                                          req)
        return content, HEADER_LENGTH not in headers


class _TokenLaneRecord:
    """The statistics, metrics and access lines of the requests a token lane (token_lanes.cpp) answered, in
    one call on the front's dispatcher thread at most every 20 ms (the lane asks with a RECORDS item; its step
    loop never waits for the GIL), and before statistics or metrics are read (LocalBackend.read_hooks)."""

    def __init__(self, backend: LocalBackend, served):
        self.served = served
        self.success = backend.metrics.requests.labels(served.name, "success")

    def __call__(self, latencies: list, rows: list, ids: list, protocols: list) -> None:
        served, n, total = self.served, len(latencies), sum(latencies)
        served.stats.record(True, total, infer=total, rows=sum(rows), requests=n)
        self.success.inc(n)
        served.engine.count_lane_requests(latencies)
        if ACCESS.isEnabledFor(logging.INFO):
            for rid, seconds, count, protocol in zip(ids, latencies, rows, protocols):
                access_line(rid or new_request_id(), served.name, protocol, 200, seconds,
                            {"rows": count, "parse_s": 0.0, "queue_s": 0.0, "compute_s": seconds})


async def start_native_grpc(backend, host: str, port: int, max_message_bytes: int = 64 * 2**20, restricted=(),
                            tls: dict | None = None):
    """The native front end on the running event loop; returns (server, bound port)."""
    server = NativeGrpcServer(backend, f"{host}:{port}", max_message_bytes, restricted, tls)
    return server, server.port


async def start_native_http(grpc_server, backend, config: dict, max_body_bytes: int, restricted=()):
    """The native HTTP front end (config: background.native_http_config's), on the native gRPC server's front
    where one runs (its lanes serve both wires), else on a front of its own; returns (server, bound port)."""
    server = grpc_server if isinstance(grpc_server, NativeGrpcServer) else NativeGrpcServer(
        backend, None, max_body_bytes, restricted)
    port = server.serve_http(config["host"], config["port"], config["upstream"], max_body_bytes, config["tls"])
    return server, port


FRONTENDS = ("native", "python")


def grpc_frontend_of(choice: str | None):
    """(name, start function) of the gRPC front end to run: `choice`, else $CELLSERVE_GRPC_FRONTEND, else
    native where it was built."""
    choice = choice or os.environ.get("CELLSERVE_GRPC_FRONTEND") or None
    if choice not in (None, *FRONTENDS):
        raise ValueError(f"--frontend is one of {', '.join(FRONTENDS)}, not {choice!r}")
    if choice == "native" and not AVAILABLE:
        raise ValueError("--frontend native: this build has no native gRPC front end (grpc++ was missing when "
                         "cellserve was built; Debian/Ubuntu: apt-get install libgrpc++-dev, then reinstall)")
    if choice == "python" or not AVAILABLE:
        from cellserve.server.grpc_service import start_grpc
        return "python", start_grpc
    return "native", start_native_grpc
