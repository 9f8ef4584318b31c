"""The HTTP front end: Open Inference Protocol v2 routes (with Triton's repository, statistics and
configuration extensions) over a Backend (backend.py), Prometheus metrics, and the gRPC service started
beside it on the same event loop and engines. It only converts: HTTP bodies to requests and responses
back (protocol.py).

Every refusal, unknown routes included, answers {"error": message} with its 4xx/5xx status.
"""

from __future__ import annotations

import asyncio
import json
import re
from importlib import resources
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from cellserve import __version__
from cellserve.server.protocol import HEADER_LENGTH, InferRequest, build_response, parse_infer_request
from cellserve.server.repository import Repository
from cellserve.server.auth import http_group, refusal
from cellserve.server.backend import DEFAULT_MAX_BODY_BYTES, LocalBackend, ServiceError
from cellserve.server.telemetry import log, observed_infer
from cellserve.server.websocket import add_stream_routes

LIVE_PAGE = (resources.files("cellserve.assets") / "live.html").read_text()
INFER_DOC = {
    "requestBody": {"content": {"application/json": {"schema": {
        "type": "object", "required": ["inputs"],
        "properties": {"id": {"type": "string"}, "parameters": {"type": "object", "properties": {
            "sequence_id": {"type": ["string", "integer"]}, "sequence_start": {"type": "boolean"},
            "sequence_end": {"type": "boolean"}, "sequence_snapshot": {"type": "boolean"},
            "sequence_restore": {"type": "boolean"}}},
            "inputs": {"type": "array", "items": {"type": "object", "required": ["name", "shape", "datatype"],
                                                   "properties": {"name": {"type": "string"},
                                                                  "shape": {"type": "array", "items": {"type": "integer"}},
                                                                  "datatype": {"type": "string"},
                                                                  "data": {"type": "array"}}}},
            "outputs": {"type": "array", "items": {"type": "object"}}}}}}},
}


def create_app(backend, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, backend_provider=None,
               grpc_port: int | None = None, grpc_host: str = "127.0.0.1", model_control: str = "none",
               restricted: tuple = (), tls: dict | None = None, grpc_frontend: str | None = None) -> App:
    """The HTTP API over a backend: a Repository (served here) or any Backend. backend_provider, when given, is called per request instead (the Ray Serve ingress
    binds its router after Ray has copied the app into the replica). With grpc_port, the gRPC service
    runs beside it (0 picks a free port; app.state.grpc_port tells which). model_control: "none" (load and
    unload refused) or "explicit", as Triton's --model-control-mode. restricted: auth.Restriction's for both
    wires. tls: {"certfile", "keyfile"[, "ca_certfile"]} for the gRPC port (uvicorn takes HTTP's).
    grpc_frontend: "native" (grpc++, where it was built: the default then) or "python" (grpcio)."""
    if isinstance(backend, Repository):
        backend = LocalBackend(backend, max_body_bytes, model_control=model_control)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        target = app.state.backend
        if hasattr(target, "start"):
            target.start()
        grpc_server = http_server = None
        if grpc_port is not None:
            grpc_server, app.state.grpc_port = await start(current, grpc_host, grpc_port, restricted=restricted,
                                                           tls=tls)
            log.info("gRPC on %s:%d, %s front end", grpc_host, app.state.grpc_port, app.state.grpc_frontend)
        native_http = getattr(app.state, "native_http", None)  # (set by whoever runs uvicorn: background.py)
        if native_http is not None:
            from cellserve.server.native.grpc_front import start_native_http

            http_server, app.state.http_port = await start_native_http(grpc_server, current, native_http,
                                                                       max_body_bytes, restricted)
            app.state.http_frontend = "native"
            log.info("HTTP on %s:%d, native front end", native_http["host"], app.state.http_port)
        yield
        if http_server is not None and http_server is not grpc_server:
            await http_server.stop(grace=5)
        if grpc_server is not None:
            await grpc_server.stop(grace=5)
        if hasattr(target, "stop"):  # graceful: running requests finish (or fail clearly), nothing hangs
            await asyncio.get_running_loop().run_in_executor(None, target.stop)

    app = App(title="cellserve", version=__version__, lifespan=lifespan,
                  description="Open Inference Protocol (KServe v2) server for recurrent models with cellular batching.")
    app.state.backend = backend
    app.state.grpc_frontend, start = None, None
    if grpc_port is not None:
        from cellserve.server.native.grpc_front import grpc_frontend_of

        app.state.grpc_frontend, start = grpc_frontend_of(grpc_frontend)
    current = backend_provider or (lambda: app.state.backend)

    if restricted:
        @app.middleware("http")
        async def _restrict(request: Request, call_next):
            refused = refusal(list(restricted), http_group(request.method, request.url.path), request.headers)
            if refused is not None:
                return JSONResponse({"error": refused[1]}, status_code=refused[0])
            return await call_next(request)

    @app.exception_handler(ServiceError)
    async def _service_error(request, exc: ServiceError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _route_error(request, exc: StarletteHTTPException):
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return JSONResponse({"error": message}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        return JSONResponse({"error": f"malformed request: {exc.errors()}"}, status_code=400)

    @app.get("/v2", summary="Server metadata")
    async def server_metadata():
        meta = await current().server_metadata()
        fronts = {f"{wire}_frontend": getattr(app.state, f"{wire}_frontend", None) for wire in ("grpc", "http")}
        return {**meta, **{key: name for key, name in fronts.items() if name}}

    @app.get("/v2/health/live", summary="Liveness")
    async def live():
        return Response(status_code=200)

    @app.get("/v2/health/ready", summary="Readiness: every model's engine is running")
    async def ready():
        return Response(status_code=200 if await current().ready() else 503)

    @app.get("/v2/models/{name}", summary="Model metadata")
    @app.get("/v2/models/{name}/versions/{version}", include_in_schema=False)
    async def model_metadata(name: str, version: str | None = None):
        return await current().model_metadata(name, version)

    @app.get("/v2/models/{name}/ready", summary="Model readiness")
    @app.get("/v2/models/{name}/versions/{version}/ready", include_in_schema=False)
    async def model_ready(name: str, version: str | None = None):
        return Response(status_code=200 if await current().model_ready(name, version) else 503)

    @app.get("/v2/models/{name}/config", summary="Model configuration (Triton's shape)")
    @app.get("/v2/models/{name}/versions/{version}/config", include_in_schema=False)
    async def model_config(name: str, version: str | None = None):
        return await current().model_config(name, version)

    @app.get("/v2/models/stats", summary="Statistics of every model (Triton's shape)")
    async def all_statistics():
        return await current().statistics()

    @app.get("/v2/models/{name}/stats", summary="Model statistics (Triton's shape)")
    @app.get("/v2/models/{name}/versions/{version}/stats", include_in_schema=False)
    async def model_statistics(name: str, version: str | None = None):
        return await current().statistics(name, version)

    async def answer_infer(name: str, version: str | None, headers, body: bytes) -> tuple[int, bytes, dict]:
        """One inference request over HTTP: (status, body, headers); errors answer {"error": message}. The
        X-Request-ID header, when sent, names the request in the server's log; it is echoed back."""
        parsed: list[InferRequest] = []

        def parse() -> InferRequest:
            parsed.append(parse_infer_request(body, headers.get(HEADER_LENGTH)))
            return parsed[0]

        try:
            (content, response_headers), request_id = await observed_infer(
                current(), name, parse, version, "http", lambda response: build_response(response, parsed[0]),
                headers.get("x-request-id"), headers)
        except ServiceError as exc:
            return _error(exc.status, str(exc))
        if request_id.isascii() and request_id.isprintable():  # (a body's id may hold what no header can)
            response_headers["X-Request-ID"] = request_id
        return 200, content, response_headers

    @app.post("/v2/models/{name}/infer", summary="Inference", openapi_extra=INFER_DOC)
    @app.post("/v2/models/{name}/versions/{version}/infer", include_in_schema=False)
    async def infer(name: str, request: Request, version: str | None = None):
        """The documented route; requests reach answer_infer through App.__call__'s direct path first."""
        body = await _read_body(request, max_body_bytes)
        status, content, headers = await answer_infer(name, version, request.headers, body)
        return Response(content, status_code=status, headers=headers)

    app.state.direct_infer = (answer_infer, max_body_bytes, list(restricted))
    add_stream_routes(app, current, restricted, max_body_bytes)

    @app.post("/v2/repository/index", summary="Models in the repository and their state")
    async def repository_index(request: Request):
        options = await _json_body(request)
        return await current().repository_index(bool(options.get("ready", False)))

    @app.post("/v2/repository/models/{name}/load", summary="Load or reload a model from its folder")
    async def load(name: str):
        await current().load(name)
        return Response(status_code=200)

    @app.post("/v2/repository/models/{name}/unload", summary="Stop serving a model (in-flight requests finish)")
    async def unload(name: str):
        await current().unload(name)
        return Response(status_code=200)

    @app.get("/", summary="Live page: each model's batching, queue, sessions and latency", include_in_schema=False)
    async def live_page():
        return HTMLResponse(LIVE_PAGE)

    @app.get("/api/live", summary="The live page's figures: per model, the last minutes of batching, latency and "
                                  "throughput, sampled each second from the engine's counters")
    async def live(window: float | None = None):
        if window is not None and not window > 0:
            raise ServiceError(400, "window must be a positive number of seconds")
        return await current().live(window)

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus():
        return Response(await current().metrics_text(), media_type=CONTENT_TYPE_LATEST)

    return app


INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")


class App(FastAPI):
    """FastAPI, with inference requests answered straight from the ASGI scope. FastAPI's layers (routing,
    its middleware stack, parameter binding) cost as much server CPU as the inference itself on a small
    model: bench http's overhead at 16 clients is that CPU queueing on one core."""

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path, root = scope["path"], scope.get("root_path", "")
            match = INFER_PATH.fullmatch(path[len(root):] if root and path.startswith(root) else path)
            if match is not None and hasattr(self.state, "direct_infer"):
                return await _direct_infer(self.state.direct_infer, match, scope, receive, send)
        await super().__call__(scope, receive, send)


async def _direct_infer(direct, match, scope, receive, send) -> None:
    answer, limit, restricted = direct
    headers = Headers(scope=scope)
    refused = refusal(restricted, "inference", headers) if restricted else None
    if refused is not None:
        status, content, out = _error(*refused)
    else:
        try:  # (answer turns the backend's failures, unexpected ones included, into statuses)
            body = await _receive_body(receive, headers.get("content-length"), limit)
            status, content, out = await answer(match[1], match[2], headers, body)
        except ServiceError as exc:
            status, content, out = _error(exc.status, str(exc))
    raw = [(k.lower().encode(), v.encode()) for k, v in out.items()]
    raw.append((b"content-length", str(len(content)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": content})


def _error(status: int, message: str) -> tuple[int, bytes, dict]:
    """A refusal as the direct path answers it: {"error": message}, as the exception handlers do."""
    return status, json.dumps({"error": message}).encode(), {"Content-Type": "application/json"}


async def _receive_body(receive, declared: str | None, limit: int) -> bytes:
    """The request body from ASGI messages, refused (413) past `limit` bytes, declared or sent."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ServiceError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ServiceError(400, "the client went away before its request body arrived")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ServiceError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _read_body(request: Request, limit: int) -> bytes:
    return await _receive_body(request.receive, request.headers.get("content-length"), limit)


async def _json_body(request: Request) -> dict:
    body = await _read_body(request, 1 << 16)
    if not body.strip():
        return {}
    try:
        value = json.loads(body)
    except ValueError as exc:
        raise ServiceError(400, f"request body is not valid JSON: {exc}")
    if not isinstance(value, dict):
        raise ServiceError(400, "request body must be a JSON object")
    return value
