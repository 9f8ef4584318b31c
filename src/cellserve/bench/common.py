"""Shared measurement helpers: thread pinning, median timing, memory bandwidth, a process's CPU time, tables
and JSON."""

from __future__ import annotations

import json
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

console = Console(width=None if Console().is_terminal else 160)  # logs and CI get whole table rows


@contextlib.contextmanager
def limit_threads(threads: int = 1):
    """Run the block with our kernels (on this thread), BLAS and (if loaded) torch on `threads` intra-op
    threads."""
    import sys

    from threadpoolctl import threadpool_limits

    from cellserve import kernels

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    previous = kernels.get_threads()
    kernels.set_threads(threads)
    try:
        with threadpool_limits(threads):
            yield
    finally:
        kernels.set_threads(previous)


def median_us(fn, seconds: float = 0.3, repeats: int = 7) -> float:
    """Median microseconds per call of fn over `repeats` timed loops lasting ~seconds in all."""
    fn()  # warm-up: caches, lazy allocations
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    loops = max(1, int(seconds / repeats / once))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        samples.append((time.perf_counter() - start) / loops * 1e6)
    return float(np.median(samples))


def interleaved_us(fns: dict, seconds: float = 0.3, rounds: int = 9) -> dict[str, float]:
    """Median microseconds per call of each function, timed in alternating rounds (every round times each
    once), so drift on a shared machine hits all alike. `seconds` is the budget for all of them."""
    loops = {}
    for name, fn in fns.items():
        fn()  # warm-up: caches, lazy allocations
        start = time.perf_counter()
        fn()
        loops[name] = max(1, int(seconds / rounds / len(fns) / max(time.perf_counter() - start, 1e-7)))
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(loops[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / loops[name] * 1e6)
    return {name: float(np.median(s)) for name, s in samples.items()}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or the platform's processor string elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def cpu_has_amx() -> bool:
    """Whether the CPU reports AMX-BF16 and AMX-INT8 (/proc/cpuinfo), whatever the OS grants."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return {"amx_tile", "amx_bf16", "amx_int8"} <= set(flags.split(":", 1)[1].split())


def machine_line() -> str:
    """What a figure was measured on: the CPU, its cores, and the kernel path that ran (and, where the CPU has
    AMX but the OS refused this process its tile state, that the AVX-512 paths run instead)."""
    from cellserve.kernels import _native

    refused = "; AMX refused by the OS (arch_prctl), AVX-512 runs" if cpu_has_amx() and "avx512-amx" not in \
        _native.isas() else ""
    return (f"CPU: {cpu_model()}, {os.cpu_count()} cores; kernel path: {_native.isa()} (of {', '.join(_native.isas())})"
            f"{refused}")


def memory_bandwidth_gbs(megabytes: int = 256) -> float:
    """Streaming copy bandwidth (bytes read + written per second), median of 5, in GB/s."""
    src = np.ones(megabytes * 2**20 // 4, dtype=np.float32)
    dst = np.empty_like(src)
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        np.copyto(dst, src)
        samples.append(2 * src.nbytes / (time.perf_counter() - start))
    return float(np.median(samples)) / 1e9


_thread_ns: dict[tuple[int, int, int], int] = {}  # (pid, its start time, thread id) -> runtime when last read
_unseen_s: dict[tuple[int, int], float] = {}  # (pid, start time) -> ticks of threads that ended before its first read


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc): the sum of its threads' runtimes in ns
    (task/*/schedstat), a thread that has ended counted as last read. /proc/<pid>/stat counts whole 10 ms
    ticks, which is +-25 us a request over a phase of 400; its count (less what threads that ended before the
    first read ran) is taken where it is more than a tick above (a thread that ran and ended between reads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    process = (pid, int(fields[19]))  # (a pid used again is another process)
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return ticks
    for task in tasks:
        try:
            _thread_ns[(*process, int(task.name))] = int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
    precise = sum(ns for key, ns in _thread_ns.items() if key[:2] == process) / 1e9
    counted = ticks - _unseen_s.setdefault(process, max(0.0, ticks - precise))
    return counted if counted > precise + 0.011 else precise


def tree_cpu_seconds(pid: int) -> float:
    """process_cpu_seconds of a process and its live descendants (a server whose model runs in a child, as
    Triton's Python backend stub does)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += process_cpu_seconds(p)
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server the bench starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_ticks() -> list[int] | None:
    try:
        return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None


class StolenTime:
    """The share of the machine's CPU time that the hypervisor gave to other guests while the block ran
    (`steal` in /proc/stat; None off Linux). On a shared VM a run with a high share measured a slower
    machine: the benches print it beside their figures, so a slow run explains itself."""

    def __enter__(self):
        self.start, self.share = _cpu_ticks(), None
        return self

    def __exit__(self, *exc):
        end = _cpu_ticks()
        if self.start and end:
            delta = [b - a for a, b in zip(self.start, end)]
            self.share = delta[7] / sum(delta) if sum(delta) else 0.0
        return False


def write_json(path: str | Path | None, payload: dict, quiet: bool = False) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine_line(), **payload}, indent=2))
    if not quiet:
        console.print(f"wrote {path}")


def print_table(title: str, rows: list[dict], columns: list[tuple[str, str]], caption: str | None = None) -> None:
    """columns: (key, header); floats print with 3 significant digits."""
    table = Table(title=title, caption=caption)
    for _, header in columns:
        table.add_column(header, justify="right")
    for row in rows:
        table.add_row(*[_fmt(row.get(key)) for key, _ in columns])
    console.print(table)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


class ServeProcess:
    """`cellserve serve` in a process of its own: on a model repository (the embedded models without one),
    with a gRPC front end (the default without one). A context manager: ready on entry, stopped on exit."""

    def __init__(self, model_dir: Path | None = None, frontend: str | None = None):
        self._start([sys.executable, "-m", "cellserve.cli", "serve", *([str(model_dir)] if model_dir else []),
                     "--port", "{port}", "--grpc-port", "{grpc_port}", "--log-level", "warning",
                     *(["--frontend", frontend] if frontend else [])])

    def _start(self, command: list[str], env: dict | None = None) -> None:
        """Start `command` on two free ports ({port}: HTTP, {grpc_port}: gRPC)."""
        self.port, self.grpc_port = free_port(), free_port()
        command = [c.format(port=self.port, grpc_port=self.grpc_port) for c in command]
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.pid = self.process.pid

    def __enter__(self) -> "ServeProcess":
        import httpx

        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/v2/health/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.process.stdout.read()}")
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError("the server did not become ready")

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.pid)

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
