"""Open-loop Poisson load: requests arrive on a seeded schedule whatever the server is doing, and each
latency runs from the scheduled arrival to the result (so a slow submitter cannot hide queueing)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from cellserve.engine import Engine, EngineFull


@dataclass
class LoadResult:
    offered: int
    completed: int
    refused: int  # turned away at admission (queue full)
    failed: int  # answered with an error, e.g. still unfinished when the drain time ran out
    lost: int
    latencies_s: np.ndarray
    throughput_rps: float

    def percentile_ms(self, q: float) -> float | None:
        return float(np.percentile(self.latencies_s, q) * 1000) if len(self.latencies_s) else None


def poisson_arrivals(rate_rps: float, duration_s: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate_rps, size=int(rate_rps * duration_s * 1.5) + 10)
    times = np.cumsum(gaps)
    return times[times < duration_s]


def run_load(engine: Engine, requests: list[dict], arrivals: np.ndarray, drain_s: float) -> LoadResult:
    """Submit requests[i] at arrivals[i] (seconds from now); wait up to drain_s after the last arrival."""
    done_at: dict[int, float] = {}
    errors: dict[int, BaseException] = {}
    lock = threading.Lock()
    futures, refused = {}, 0
    start = time.perf_counter()

    def finished(i, future):
        now = time.perf_counter()
        with lock:
            if future.exception() is None:
                done_at[i] = now
            else:
                errors[i] = future.exception()

    for i, (inputs, at) in enumerate(zip(requests, arrivals)):
        delay = start + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        try:
            future = engine.submit(inputs)
        except EngineFull:
            refused += 1
            continue
        futures[i] = future
        future.add_done_callback(lambda f, i=i: finished(i, f))
    deadline = time.perf_counter() + drain_s
    while time.perf_counter() < deadline and any(not f.done() for f in futures.values()):
        time.sleep(0.01)
    engine.stop(drain=False)  # whatever is left fails loudly, it is not dropped
    time.sleep(0.01)
    with lock:
        completed = sorted(done_at)
        latencies = np.array([done_at[i] - (start + arrivals[i]) for i in completed])
        last = max(done_at.values(), default=start)
        failed = len(errors)
    first = start + (arrivals[0] if len(arrivals) else 0)
    span = max(last - first, 1e-9)
    # lost: neither a result, nor a refusal, nor an error (EngineStopped after the drain counts as an error)
    lost = len(requests) - len(completed) - refused - failed
    return LoadResult(offered=len(requests), completed=len(completed), refused=refused, failed=failed, lost=lost,
                      latencies_s=latencies, throughput_rps=len(completed) / span)
