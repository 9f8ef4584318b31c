"""What the server tells its operator about each request, whatever the wire: one access line per request
(logger `cellserve.access`), a failure's traceback under its request id (logger `cellserve.server`), through
the standard logging module in text or JSON lines. HTTP and gRPC both answer inference through
`observed_infer`, so both log (and trace) alike.

`configure_telemetry` is what `cellserve serve --log-level --log-format --trace` sets up; a program embedding the server
configures logging its own way and gets the same records."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import sys
import time
import uuid

from cellserve.server import tracing
from cellserve.server.backend import ServiceError
from cellserve.server.protocol import InferResponse

ACCESS = logging.getLogger("cellserve.access")
log = logging.getLogger("cellserve.server")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


class JsonLines(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the record's `fields`, and a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                 "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logs(level: str = "info", fmt: str = "text", stream=None) -> logging.Handler:
    """Every logger (ours, uvicorn's, gRPC's) to one stream (stderr) at `level`, as text or JSON lines."""
    if level not in LOG_LEVELS or fmt not in LOG_FORMATS:
        raise ValueError(f"--log-level is one of {', '.join(LOG_LEVELS)} and --log-format one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLines() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):  # uvicorn's own handlers would print twice
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    return handler


def configure_telemetry(log_level: str = "info", log_format: str = "text", trace: str | None = None,
                        trace_ratio: float = 1.0) -> None:
    """This process's logs, and with a --trace spec its tracing: what `cellserve serve` sets up, and what each
    Ray replica (a process of its own) sets up again with the launcher's settings."""
    configure_logs(log_level, log_format)
    if trace:
        tracing.configure(trace, ratio=trace_ratio)


ID_PREFIX = uuid.uuid4().hex[:6]  # this process's: ids stay distinct across restarts
_ID_COUNTER = itertools.count()


def new_request_id() -> str:
    """16 hex digits, unique in this process: a random prefix and a counter (uuid4 per request read
    os.urandom each time: 2% of a loaded HTTP server's samples)."""
    return f"{ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFFFF:010x}"


async def observed_infer(backend, name: str, parse, version: str | None, protocol: str, encode,
                         request_id: str | None = None, carrier=None) -> tuple[object, str]:
    """backend.infer, then encode(response) for the wire, logged and (when on) traced: returns (encoded,
    request id). The id is the client's (the request's `id`, or the wire's request-id header) or a new one.
    An unexpected failure is logged with its traceback and answered as a clean 500 that names the id.
    carrier: the HTTP headers or gRPC metadata, for a W3C traceparent."""
    start = time.perf_counter()
    span = tracing.start(f"infer {name}", carrier, time.time_ns()) if tracing.TRACER is not None else None
    parsed = []

    def parse_and_keep():
        request = parse() if callable(parse) else parse
        parsed.append(request)
        return request

    status, response = 200, None
    try:
        response = await backend.infer(name, parse_and_keep, version)
        request_id = request_id or response.id or _fallback_id(parsed)
        return encode(response), request_id
    except ServiceError as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499  # the client went away (nginx's code for it)
        raise
    except Exception as exc:
        status, request_id = 500, request_id or _fallback_id(parsed)
        raise internal_error(request_id, name, protocol, exc)
    finally:
        timing = response.timing if response is not None else {}
        if ACCESS.isEnabledFor(logging.INFO) or span is not None:
            request_id = request_id or (response.id if response is not None else None) or _fallback_id(parsed)
        if ACCESS.isEnabledFor(logging.INFO):
            access_line(request_id, name, protocol, status, time.perf_counter() - start, timing)
        if span is not None:
            tracing.finish(span, time.time_ns(), timing, {
                "cellserve.request_id": request_id, "cellserve.model": name, "cellserve.protocol": protocol,
                "cellserve.rows": timing.get("rows", 0), "http.response.status_code": status})


def _fallback_id(parsed: list) -> str:
    return parsed[0].id if parsed and parsed[0].id else new_request_id()


def internal_error(request_id: str, name: str, protocol: str, exc: BaseException) -> ServiceError:
    """An unexpected failure, logged with its traceback under the request's id, as the clean 500 that
    the client gets."""
    log.error("request %s to model %s failed", request_id, name, exc_info=(type(exc), exc, exc.__traceback__),
              extra={"fields": {"request_id": request_id, "model": name, "protocol": protocol}})
    return ServiceError(500, f"internal error in request {request_id} ({type(exc).__name__}); the server log "
                             "has the details")


def access_line(request_id: str, model: str, protocol: str, status: int, total_s: float, timing: dict) -> None:
    """One request's line in the access log (logger cellserve.access)."""
    fields = {"request_id": request_id, "model": model, "protocol": protocol, "rows": timing.get("rows", 0),
              "queue_ms": round(timing.get("queue_s", 0.0) * 1e3, 3),
              "compute_ms": round(timing.get("compute_s", 0.0) * 1e3, 3), "total_ms": round(total_s * 1e3, 3),
              "status": status}
    ACCESS.info("%(request_id)s %(model)s %(protocol)s rows=%(rows)d queue=%(queue_ms).2fms "
                "compute=%(compute_ms).2fms total=%(total_ms).2fms status=%(status)d", fields,
                extra={"fields": fields})
