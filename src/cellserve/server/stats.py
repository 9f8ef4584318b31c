"""Per-model request statistics in Triton's shape (GET /v2/models/<m>/stats, gRPC ModelStatistics)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, n: int = 1) -> None:
        self.count += n
        self.ns += int(seconds * 1e9)


@dataclass
class InferenceStats:
    """Per-model request statistics in Triton's shape (GET /v2/models/<m>/stats, gRPC ModelStatistics):
    success/fail count requests with their total time; queue, compute_input (parsing), compute_infer
    (the engine) and compute_output (building the reply) split the successful ones' time."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0  # batch rows (engine requests) of successful requests
    last_inference: int = 0  # ms since the epoch
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, ok: bool, total: float, parse: float = 0.0, queue: float = 0.0, infer: float = 0.0,
               output: float = 0.0, rows: int = 0, requests: int = 1) -> None:
        """One request, or `requests` of them with their times summed (a native front end's step)."""
        with self.lock:
            if not ok:
                self.fail.add(total, requests)
                return
            self.success.add(total, requests)
            self.compute_input.add(parse, requests)
            self.queue.add(queue, requests)
            self.compute_infer.add(infer, requests)
            self.compute_output.add(output, requests)
            self.inference_count += rows
            self.last_inference = int(time.time() * 1000)

    def triton(self, name: str, version: str, execution_count: int) -> dict:
        names = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
        with self.lock:
            stats = {k: {"count": getattr(self, k).count, "ns": getattr(self, k).ns} for k in names}
            return {"name": name, "version": version, "last_inference": self.last_inference,
                    "inference_count": self.inference_count, "execution_count": execution_count,
                    "inference_stats": {**stats, "cache_hit": {"count": 0, "ns": 0},
                                        "cache_miss": {"count": 0, "ns": 0}},
                    "batch_stats": []}
