"""The HTTP server: Open Inference Protocol v2 endpoints, streaming sessions, Prometheus metrics.

Every bad request gets a 4xx with {"error": message}; a full queue or a stopping server gets 503. The
handler only parses, submits to the engine and waits on its future, so one request's failure never
touches another's.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cellserve import __version__
from cellserve.engine import EngineFull, EngineStopped
from cellserve.server.metrics import Metrics
from cellserve.server.protocol import HEADER_LENGTH, ProtocolError, build_response, parse_infer_request
from cellserve.server.repository import Repository

DEFAULT_MAX_BODY_BYTES = 16 * 2**20
INFER_DOC = {
    "requestBody": {"content": {"application/json": {"schema": {
        "type": "object", "required": ["inputs"],
        "properties": {"id": {"type": "string"}, "parameters": {"type": "object", "properties": {
            "sequence_id": {"type": ["string", "integer"]}, "sequence_start": {"type": "boolean"},
            "sequence_end": {"type": "boolean"}}},
            "inputs": {"type": "array", "items": {"type": "object", "required": ["name", "shape", "datatype"],
                                                   "properties": {"name": {"type": "string"},
                                                                  "shape": {"type": "array", "items": {"type": "integer"}},
                                                                  "datatype": {"type": "string"},
                                                                  "data": {"type": "array"}}}},
            "outputs": {"type": "array", "items": {"type": "object"}}}}}}},
}


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class LocalBackend:
    """Models served by engines in this process. `replica` names the process when several serve
    (Ray Serve shards); it is reported in infer responses and metrics."""

    def __init__(self, repository: Repository, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 replica: int | None = None):
        self.repository, self.max_body_bytes, self.replica = repository, max_body_bytes, replica
        self.metrics = Metrics()
        for served in repository.models.values():
            self.metrics.watch(served)

    def start(self) -> None:
        self.repository.start()

    def stop(self) -> None:
        self.repository.stop()

    def _model(self, name: str):
        served = self.repository.get(name)
        if served is None:
            raise HTTPError(404, f"unknown model {name!r}; this server has {sorted(self.repository.models)}")
        return served

    async def ready(self) -> bool:
        return all(m.engine.running for m in self.repository.models.values())

    async def model_metadata(self, name: str) -> dict:
        return self._model(name).metadata()

    async def model_ready(self, name: str) -> bool:
        return self._model(name).engine.running

    async def metrics_text(self) -> bytes:
        return generate_latest(self.metrics.registry)

    async def infer(self, name: str, body: bytes, header_length: str | None) -> tuple[bytes, dict]:
        served = self._model(name)
        try:
            result = await self._infer(served, body, header_length)
        except HTTPError as exc:
            self.metrics.requests.labels(name, f"http_{exc.status}").inc()
            raise
        self.metrics.requests.labels(name, "success").inc()
        return result

    async def _infer(self, served, body: bytes, header_length: str | None):
        try:
            req = parse_infer_request(body, header_length)
            sequence = _sequence_parameters(req.parameters, served.stateful)
            inputs = served.requests(req.inputs)
            if sequence and len(inputs) != 1:
                raise ProtocolError("a sequence chunk carries one stream (batch size 1)")
        except ProtocolError as exc:
            raise HTTPError(400, str(exc))
        futures = []
        try:
            for item in inputs:
                futures.append(served.engine.submit(item, **sequence))
            results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        except ValueError as exc:  # bad values the model rejects, unknown/expired sessions
            _cancel(futures)
            raise HTTPError(400, str(exc))
        except EngineFull as exc:
            _cancel(futures)
            raise HTTPError(503, str(exc))
        except EngineStopped as exc:
            raise HTTPError(503, str(exc))
        except asyncio.CancelledError:  # the client went away: free the engine's slots
            _cancel(futures)
            raise
        outputs, parameters = served.outputs_of(results)
        if sequence:
            parameters = {**parameters, "sequence_id": sequence["sequence_id"]}
        if self.replica is not None:
            parameters = {**parameters, "replica": self.replica}
        try:
            return build_response(served.name, served.version, req, outputs, parameters)
        except ProtocolError as exc:
            raise HTTPError(400, str(exc))


def create_app(backend, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, backend_provider=None) -> FastAPI:
    """The HTTP API over a backend: a Repository (served here) or any object with LocalBackend's
    async methods. backend_provider, when given, is called per request instead (the Ray Serve ingress
    binds its router after Ray has copied the app into the replica)."""
    if isinstance(backend, Repository):
        backend = LocalBackend(backend, max_body_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        target = app.state.backend
        if hasattr(target, "start"):
            target.start()
        yield
        if hasattr(target, "stop"):  # graceful: running requests finish (or fail clearly), nothing hangs
            await asyncio.get_running_loop().run_in_executor(None, target.stop)

    app = FastAPI(title="cellserve", version=__version__, lifespan=lifespan,
                  description="Open Inference Protocol (KServe v2) server for recurrent models with cellular batching.")
    app.state.backend = backend
    current = backend_provider or (lambda: app.state.backend)

    @app.exception_handler(HTTPError)
    async def _http_error(request, exc: HTTPError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.get("/v2", summary="Server metadata")
    async def server_metadata():
        return {"name": "cellserve", "version": __version__, "extensions": ["binary_tensor_data", "sequence"]}

    @app.get("/v2/health/live", summary="Liveness")
    async def live():
        return Response(status_code=200)

    @app.get("/v2/health/ready", summary="Readiness: every model's engine is running")
    async def ready():
        return Response(status_code=200 if await current().ready() else 503)

    @app.get("/v2/models/{name}", summary="Model metadata")
    @app.get("/v2/models/{name}/versions/{version}", include_in_schema=False)
    async def model_metadata(name: str, version: str | None = None):
        return await current().model_metadata(name)

    @app.get("/v2/models/{name}/ready", summary="Model readiness")
    @app.get("/v2/models/{name}/versions/{version}/ready", include_in_schema=False)
    async def model_ready(name: str, version: str | None = None):
        return Response(status_code=200 if await current().model_ready(name) else 503)

    @app.post("/v2/models/{name}/infer", summary="Inference", openapi_extra=INFER_DOC)
    @app.post("/v2/models/{name}/versions/{version}/infer", include_in_schema=False)
    async def infer(name: str, request: Request, version: str | None = None):
        body = await _read_body(request, max_body_bytes)
        content, headers = await current().infer(name, body, request.headers.get(HEADER_LENGTH))
        return Response(content, headers=headers)

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus():
        return Response(await current().metrics_text(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _sequence_parameters(parameters: dict, stateful: bool) -> dict:
    """sequence_id / sequence_start / sequence_end, checked; {} for a stateless request."""
    if "sequence_id" not in parameters:
        if parameters.get("sequence_start") or parameters.get("sequence_end"):
            raise ProtocolError("sequence_start/sequence_end need a sequence_id")
        return {}
    if not stateful:
        raise ProtocolError("this model is stateless; it does not take sequence parameters")
    sid = parameters["sequence_id"]
    if isinstance(sid, bool) or not isinstance(sid, (int, str)) or sid in ("", 0):
        raise ProtocolError("sequence_id must be a non-zero integer or a non-empty string")
    flags = {}
    for key in ("sequence_start", "sequence_end"):
        value = parameters.get(key, False)
        if not isinstance(value, bool):
            raise ProtocolError(f"{key} must be true or false")
        flags[key] = value
    return {"sequence_id": str(sid), **flags}


def _cancel(futures) -> None:
    for f in futures:
        f.cancel()
