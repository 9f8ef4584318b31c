"""The live view behind the page at `/` (and its JSON at `/api/live`): what each model's batcher did over
the last minutes, sampled once a second from the engine's own counters, so it costs the hot path one list
append per finished request.

Each second holds: requests finished and failed, their latency histogram (arrival to result, the same span
as cellserve_request_latency_seconds), the rows of each step (by cell type), and queue depth, running
requests and open sessions at the sample. A window's percentiles come from the summed histograms."""

from __future__ import annotations

import collections
import threading
import time

import numpy as np

WINDOW_S = 300
LATENCY_EDGES = np.geomspace(1e-5, 100.0, 141)  # seconds; bins 6.8% wide, so a percentile is within 7%


class ModelSeries:
    """One model's samples; `latencies` is appended to by the engine's observer and swapped out each second."""

    def __init__(self, served, window_s: int):
        self.served = served
        self.latencies: list[float] = []
        self.samples: collections.deque = collections.deque(maxlen=window_s)
        self.last = _counters(served.engine)

    def sample(self, now: float) -> None:
        engine = self.served.engine
        counters = _counters(engine)
        latencies, self.latencies = self.latencies, []
        histogram = np.histogram(np.clip(latencies, LATENCY_EDGES[0], LATENCY_EDGES[-1]), LATENCY_EDGES)[0] \
            if latencies else None
        steps = {key: n - self.last["batch_sizes"].get(key, 0) for key, n in counters["batch_sizes"].items()
                 if n != self.last["batch_sizes"].get(key, 0)}
        self.samples.append({"time": now, "completed": counters["completed"] - self.last["completed"],
                             "failed": counters["failed"] - self.last["failed"], "latency": histogram,
                             "steps": steps, "queue_depth": engine.queue_depth, "running": engine.active,
                             "sessions": self.served.sessions})
        self.last = counters


def _counters(engine) -> dict:
    for _ in range(10):  # the engine's thread may add a batch size while this copies the counter
        try:
            sizes = dict(engine.stats.batch_sizes)
            break
        except RuntimeError:
            continue
    else:
        sizes = {}
    return {"completed": engine.stats.completed, "failed": engine.stats.failed, "batch_sizes": sizes}


def percentile(histogram: np.ndarray, q: float) -> float | None:
    """The q-th percentile (0-100) of a latency histogram, in seconds (the bin's geometric middle)."""
    total = histogram.sum()
    if total == 0:
        return None
    index = int(np.searchsorted(np.cumsum(histogram), q / 100 * total))
    index = min(index, len(histogram) - 1)
    return float(np.sqrt(LATENCY_EDGES[index] * LATENCY_EDGES[index + 1]))


class LiveView:
    def __init__(self, window_s: int = WINDOW_S, interval_s: float = 1.0):
        self.window_s, self.interval_s = window_s, interval_s
        self.series: dict[str, ModelSeries] = {}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, served) -> ModelSeries:
        """Follow a (newly loaded) model; its engine observer appends latencies to the returned series."""
        series = ModelSeries(served, int(self.window_s / self.interval_s))
        with self.lock:
            self.series[served.name] = series
        return series

    def forget(self, name: str) -> None:
        with self.lock:
            self.series.pop(name, None)

    def sample(self) -> None:
        now = time.time()
        with self.lock:
            for series in self.series.values():
                series.sample(now)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cellserve-live", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def snapshot(self, window_s: float | None = None) -> dict:
        """Per model: the window's totals and percentiles, the per-second series, and rows per step."""
        window_s = min(window_s or self.window_s, self.window_s)
        now = time.time()
        with self.lock:
            models = {name: _summary(s, [x for x in s.samples if x["time"] > now - window_s], self.interval_s)
                      for name, s in self.series.items()}
        return {"time": now, "window_s": window_s, "interval_s": self.interval_s, "models": models}


def _summary(series: ModelSeries, samples: list[dict], interval_s: float) -> dict:
    served, engine = series.served, series.served.engine
    histogram = sum((x["latency"] for x in samples if x["latency"] is not None), np.zeros(len(LATENCY_EDGES) - 1, int))
    rows: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for x in samples:
        for (cell_type, size), n in x["steps"].items():
            rows[str(cell_type)][int(size)] += n
    completed = sum(x["completed"] for x in samples)
    steps = sum(sum(c.values()) for c in rows.values())
    mean_rows = sum(size * n for c in rows.values() for size, n in c.items()) / steps if steps else None
    p50, p99 = percentile(histogram, 50), percentile(histogram, 99)

    def ms(seconds):
        return None if seconds is None else round(seconds * 1e3, 3)

    return {
        "version": served.version, "policy": engine.policy, "max_batch": engine.max_batch,
        "max_running": engine.max_running, "step_loop": engine.runner.step_loop,
        "queue_depth": engine.queue_depth, "running": engine.active, "sessions": served.sessions,
        "listen": served.listen_input(),
        "window": {"seconds": len(samples) * interval_s, "completed": completed,
                   "failed": sum(x["failed"] for x in samples),
                   "throughput_rps": completed / (len(samples) * interval_s) if samples else 0.0,
                   "p50_ms": ms(p50), "p99_ms": ms(p99), "steps": steps, "mean_rows_per_step": mean_rows,
                   "occupancy": mean_rows / engine.max_batch if mean_rows is not None else None},
        "rows_per_step": {cell_type: {str(size): n for size, n in sorted(c.items())} for cell_type, c in rows.items()},
        "series": {"time": [x["time"] for x in samples],
                   "throughput_rps": [x["completed"] / interval_s for x in samples],
                   "p50_ms": [ms(percentile(x["latency"], 50)) if x["latency"] is not None else None for x in samples],
                   "p99_ms": [ms(percentile(x["latency"], 99)) if x["latency"] is not None else None for x in samples],
                   "queue_depth": [x["queue_depth"] for x in samples], "sessions": [x["sessions"] for x in samples],
                   "running": [x["running"] for x in samples]},
    }
