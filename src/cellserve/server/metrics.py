"""Prometheus metrics, one registry per app (so several apps can live in one process, as in tests)."""

from __future__ import annotations

import time

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
OVERHEAD_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01)


def observe_all(histogram, values) -> None:
    """Many observations of one labelled histogram at once. prometheus_client observes one value a call (a
    lock and a bucket scan each, ~3 us: a native loop's steps at one client cost more in it than in their
    kernels); this adds them bucket by bucket through the fields its observe() updates, or one call each
    where those are missing."""
    bounds, buckets, total = (getattr(histogram, k, None) for k in ("_upper_bounds", "_buckets", "_sum"))
    values = np.asarray(values, dtype=np.float64)
    if bounds is None or buckets is None or total is None:
        for value in values.tolist():
            histogram.observe(value)
        return
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))  # bisect_left each
    total.inc(sum(values.tolist()))  # in order, as one observe() after another adds them
    for index in np.flatnonzero(counts).tolist():
        buckets[index].inc(int(counts[index]))


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("cellserve_requests", "Inference requests by outcome", ["model", "outcome"], registry=r)
        self.latency = Histogram("cellserve_request_latency_seconds", "Engine latency, arrival to result",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("cellserve_queue_time_seconds", "Time waiting for a state slot",
                                    ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("cellserve_batch_size", "Rows per batched cell step",
                                    ["model", "cell_type"], buckets=BATCH_BUCKETS, registry=r)
        self.step_time = Histogram("cellserve_step_seconds", "Time of one batched cell step",
                                   ["model", "cell_type"], buckets=LATENCY_BUCKETS, registry=r)
        self.overhead = Histogram("cellserve_engine_overhead_seconds",
                                  "Scheduler time per step outside the model's kernels (admission, bookkeeping, "
                                  "retiring)", ["model"], buckets=OVERHEAD_BUCKETS, registry=r)
        self.kernel = Counter("cellserve_kernel_seconds", "Time inside the model's compute (kernels, and ONNX Runtime "
                              "for an imported graph's front and head)", ["model"], registry=r)
        self.sessions = Gauge("cellserve_active_sessions", "Open streaming sessions", ["model"], registry=r)
        self.pool_used = Gauge("cellserve_state_pool_used_slots", "State rows (tree nodes) in use", ["model"],
                               registry=r)
        self.pool_capacity = Gauge("cellserve_state_pool_capacity_slots", "State rows (tree nodes) held",
                                   ["model"], registry=r)
        self.queue_depth = Gauge("cellserve_queue_depth", "Requests waiting for admission", ["model"], registry=r)

    def watch(self, served, live=None) -> None:
        """Sample a model's engine at scrape time, and observe its batches and finished requests (their
        latencies also go to `live`, a live.ModelSeries, when given)."""
        name, engine = served.name, served.engine
        self.sessions.labels(name).set_function(lambda: served.sessions)
        self.pool_used.labels(name).set_function(lambda: engine.runner.used)
        self.pool_capacity.labels(name).set(engine.runner.capacity)
        self.queue_depth.labels(name).set_function(lambda: engine.queue_depth)
        engine.observer = EngineObserver(self, name, live)


class EngineObserver:
    """The engine's per-step and per-request figures into the model's metrics. The labelled series are looked
    up once (labels() took 2.6% of a loaded server's samples when called on every step)."""

    def __init__(self, metrics: Metrics, model: str, live=None):
        self.metrics, self.model, self.live = metrics, model, live
        self.overhead = metrics.overhead.labels(model)
        self.kernel = metrics.kernel.labels(model)
        self.latency = metrics.latency.labels(model)
        self.queue_time = metrics.queue_time.labels(model)
        self.per_cell: dict[str, tuple] = {}

    def _series(self, cell_type: str) -> tuple:
        series = self.per_cell.get(cell_type)
        if series is None:
            series = self.per_cell[cell_type] = (self.metrics.batch_size.labels(self.model, cell_type),
                                                 self.metrics.step_time.labels(self.model, cell_type))
        return series

    def on_batch(self, cell_type: str, size: int, seconds: float) -> None:
        series = self._series(cell_type)
        series[0].observe(size)
        series[1].observe(seconds)

    def on_batches(self, cell_type: str, sizes: list, seconds: list) -> None:
        """Steps of one cell type that a native loop ran, together."""
        series = self._series(cell_type)
        observe_all(series[0], sizes)
        observe_all(series[1], seconds)

    def on_step(self, overhead: float, seconds: float, kernel: float = 0.0) -> None:
        self.overhead.observe(overhead)
        self.kernel.inc(kernel)

    def on_latencies(self, latencies) -> None:
        """Requests a native lane answered: their seconds from arrival to result."""
        observe_all(self.latency, latencies)
        if self.live is not None:
            self.live.latencies.extend(latencies)

    def on_done(self, req) -> None:
        now = time.perf_counter()
        self.latency.observe(now - req.arrival)
        if self.live is not None:
            self.live.latencies.append(now - req.arrival)
        if req.started is not None:
            self.queue_time.observe(req.started - req.arrival)
