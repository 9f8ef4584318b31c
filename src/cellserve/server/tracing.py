"""OpenTelemetry traces of inference requests, as Triton's `--trace-config mode=opentelemetry`: off by
default, and then the hot path pays one `is None` check. `cellserve serve --trace otlp=URL|console|file=PATH`
turns them on.

A request's span ("infer <model>", kind SERVER, child of the W3C `traceparent` the client sent in HTTP headers
or gRPC metadata) has children parse, queue, one span per engine step its rows took part in (cell type and
batch size as attributes), and respond. The native step loop names a traced request's steps exactly; on the
Python loop (trees, frame streams) the spans are every step of the model while the request ran."""

from __future__ import annotations

import random
from bisect import bisect_left
from contextvars import ContextVar

from opentelemetry import trace
from opentelemetry.propagate import extract
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

from cellserve import __version__

TRACER: trace.Tracer | None = None  # set by configure(); None: tracing is off
PROVIDER: TracerProvider | None = None
RATIO = 1.0
_traced: ContextVar[bool] = ContextVar("cellserve_traced", default=False)


def exporter_for(spec: str) -> SpanExporter:
    """otlp=URL (OTLP over HTTP, e.g. http://collector:4318/v1/traces), console, or file=PATH (JSON lines)."""
    kind, _, target = spec.partition("=")
    if kind == "console" and not target:
        return ConsoleSpanExporter()
    if kind == "file" and target:
        stream = open(target, "a", buffering=1)
        return ConsoleSpanExporter(out=stream, formatter=lambda span: span.to_json(indent=None) + "\n")
    if kind == "otlp" and target:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=target)
    raise ValueError(f"--trace takes otlp=URL, console or file=PATH, not {spec!r}")


def configure(exporter: SpanExporter | str | None, processor=BatchSpanProcessor,
              ratio: float = 1.0) -> TracerProvider | None:
    """Turn tracing on with an exporter (or its --trace spec); None turns it off. ratio: the share of requests
    traced when the client sent no sampled traceparent (a sampled parent is always followed), as Triton's
    trace rate: a traced speller request records ~25 spans, about 0.8 ms of the event loop's CPU in the SDK
    (and the exporter's thread works on them after).
    Returns the provider (its shutdown() flushes)."""
    if not 0 < ratio <= 1:
        raise ValueError("--trace-ratio must be in (0, 1]")
    global TRACER, PROVIDER, RATIO
    if PROVIDER is not None:
        PROVIDER.shutdown()
    if exporter is None:
        TRACER = PROVIDER = None
        return None
    if isinstance(exporter, str):
        exporter = exporter_for(exporter)
    PROVIDER = TracerProvider(resource=Resource.create({"service.name": "cellserve", "service.version": __version__}),
                              sampler=ParentBased(ALWAYS_ON))  # a parent's flag decides; start() draws the rest
    RATIO = ratio
    PROVIDER.add_span_processor(processor(exporter))
    TRACER = PROVIDER.get_tracer("cellserve.server", __version__)
    return PROVIDER


def request_steps(log, requests, start: float, end: float) -> list[tuple]:
    """A request's steps from the engine's step log (end, seconds, cell type, rows, number): those its rows
    took part in, where the step loop names them (the native loop), else every step of its time."""
    entries = log.entries()  # a copy: the engine's thread adds meanwhile
    entries = entries[bisect_left(entries, (start,)):]
    named = [r.step_numbers for r in requests if r.step_numbers is not None]
    if named:
        numbers = set().union(*named)
        return [e for e in entries if e[4] in numbers]
    return [e for e in entries if e[0] <= end]


def epoch_ns(perf_seconds: float, offset: float) -> int:
    return int((perf_seconds + offset) * 1e9)


def start(name: str, carrier, start_ns: int):
    """The request's span, begun when it arrived (child of the carrier's traceparent); None if not sampled.
    While it is open, traced() is true in this task, so the backend gathers the marks and steps."""
    if RATIO < 1 and not (carrier and carrier.get("traceparent")) and random.random() >= RATIO:
        return None  # drawn here: the SDK's unsampled span costs a traced-off request tens of microseconds
    root = TRACER.start_span(name, context=extract(carrier) if carrier else None, kind=trace.SpanKind.SERVER,
                             start_time=start_ns)
    if not root.is_recording():
        return None
    _traced.set(True)
    return root


def traced() -> bool:
    return _traced.get()


def finish(root, end_ns: int, timing: dict, attributes: dict) -> None:
    """The request's children, after the fact, from its timing marks (perf_counter seconds, with the offset
    to the epoch of the process that measured them), and its attributes."""
    _traced.set(False)
    root.set_attributes(attributes)
    context = trace.set_span_in_context(root)
    offset = timing.get("clock_offset")
    if offset is not None:
        marks = [epoch_ns(timing[k], offset) for k in ("parsed_at", "started_at", "done_at")]
        child(context, "parse", root.start_time, marks[0], {})
        child(context, "queue", marks[0], marks[1], {})
        for step_end, seconds, cell_type, rows, _ in timing.get("steps", ()):
            child(context, "step", epoch_ns(step_end - seconds, offset), epoch_ns(step_end, offset),
                  {"cellserve.cell_type": str(cell_type), "cellserve.batch_size": int(rows)})
        child(context, "respond", marks[2], end_ns, {})
    root.end(end_time=end_ns)


def child(context, name: str, start_ns: int, end_ns: int, attributes: dict) -> None:
    TRACER.start_span(name, context=context, start_time=start_ns, attributes=attributes).end(end_time=max(start_ns, end_ns))
