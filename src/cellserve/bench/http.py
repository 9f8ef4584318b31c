"""`cellserve bench http`: what the HTTP and gRPC layers add. The same requests go to the engine in-process,
and to `cellserve serve` in a separate process over loopback by HTTP (JSON) and by gRPC, on the native and
the Python gRPC front ends (a server process each), at 1 and at 16 concurrent clients; the table gives p50/p99 of each and the difference to in-process. The
same HTTP client also calls a floor server that answers a ready-made response at once: its latency is what
the client and loopback cost alone, the client's share of the overhead.

The HTTP client is a load generator as perf_analyzer or wrk are: one event loop, one keep-alive connection
per concurrent client, requests encoded before the clock starts, responses read by their content-length and
checked for status 200. It costs about 0.1 ms of CPU per request here; 16 threads of the standard library's
http.client cost 0.7 ms, and on 2 cores shared with the server that CPU was most of the latency measured
(httpx costs 0.4 ms more than http.client). gRPC is driven by the native load generator (bench/native/
loadgen.cpp: requests encoded before the clock starts, as perf_analyzer does). Bounded in count and time;
traffic stays on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import multiprocessing
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import uvloop

from cellserve.bench.common import (ServeProcess, StolenTime, console, free_port, limit_threads, print_table,
                                    process_cpu_seconds, write_json)
from cellserve.engine import Engine
from cellserve.families import make_runner
from cellserve.server.background import http_frontend_of
from cellserve.server.native.grpc_front import AVAILABLE as NATIVE_GRPC
from cellserve.tasks.speller import MAX_NUMBER, encode_number, load_default

try:
    from cellserve.bench import _loadgen
except ImportError:  # built without grpc++
    _loadgen = None

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length:\s*(\d+)")  # in a message's head


def _floor_server(port: int, body: bytes) -> None:
    """Answer every HTTP request on the port with `body` at once (a spawned process of its own)."""
    response = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)

    class Answer(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport, self.pending = transport, b""

        def data_received(self, data):
            self.pending += data
            while True:
                head, blank, rest = self.pending.partition(b"\r\n\r\n")
                length = CONTENT_LENGTH.search(head)
                size = int(length[1]) if length else 0
                if not blank or len(rest) < size:
                    return
                self.pending = rest[size:]
                self.transport.write(response)

    loop = asyncio.new_event_loop()
    loop.run_until_complete(loop.create_server(Answer, "127.0.0.1", port))
    loop.run_forever()


def _wait_listening(port: int, seconds: float = 30) -> None:
    deadline = time.time() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.time() > deadline:
                raise RuntimeError(f"nothing listens on port {port}")
            time.sleep(0.05)


def _infer_body(number: str) -> bytes:
    """The JSON inference request for one number."""
    return json.dumps({"inputs": [{"name": "tokens", "shape": [1, len(number)], "datatype": "INT64",
                                   "data": encode_number(number)},
                                  {"name": "max_output_tokens", "shape": [1], "datatype": "INT64",
                                   "data": [16]}]}).encode()


def _binary_body(number: str) -> tuple[bytes, int]:
    """The same request with binary tensors (tritonclient.http's default): body and JSON header length."""
    tokens, limit = np.array([encode_number(number)], np.int64).tobytes(), np.array([16], np.int64).tobytes()
    header = json.dumps({"inputs": [
        {"name": "tokens", "shape": [1, len(number)], "datatype": "INT64", "parameters": {"binary_data_size": len(tokens)}},
        {"name": "max_output_tokens", "shape": [1], "datatype": "INT64",
         "parameters": {"binary_data_size": len(limit)}}]}).encode()
    return header + tokens + limit, len(header)


def _http_request(number: str, binary: bool = False) -> bytes:
    """The inference request for one number, as the client sends it: JSON, or binary tensors."""
    if binary:
        body, header_length = _binary_body(number)
        extra = b"inference-header-content-length: %d\r\ncontent-type: application/octet-stream\r\n" % header_length
    else:
        body, extra = _infer_body(number), b"content-type: application/json\r\n"
    return (b"POST /v2/models/speller/infer HTTP/1.1\r\nhost: 127.0.0.1\r\n%scontent-length: %d\r\n\r\n%s"
            % (extra, len(body), body))


def _run_http(port: int, requests: list[bytes], clients: int) -> np.ndarray:
    """Latencies (ms) of the requests sent over `clients` keep-alive connections, each sending its next request
    when its last answer has arrived. Any answer but 200 raises."""

    async def client(k: int, latencies: list) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for i in range(k, len(requests), clients):
                start = time.perf_counter()
                writer.write(requests[i])
                head = await reader.readuntil(b"\r\n\r\n")
                length = CONTENT_LENGTH.search(head)
                await reader.readexactly(int(length[1]) if length else 0)
                latencies[i] = (time.perf_counter() - start) * 1000
                if not head.startswith(b"HTTP/1.1 200"):
                    status_line = head.partition(b"\r")[0].decode()
                    raise RuntimeError(f"the server answered {status_line}")
        finally:
            writer.close()

    async def all_clients(latencies: list) -> None:
        await asyncio.gather(*(client(k, latencies) for k in range(clients)))

    latencies = [0.0] * len(requests)
    uvloop.run(all_clients(latencies))
    return np.array(latencies)


def _run(call, items, clients: int) -> np.ndarray:
    """Latencies (ms) of call(item) for each item, from `clients` threads."""
    def timed(item):
        start = time.perf_counter()
        call(item)
        return (time.perf_counter() - start) * 1000

    with ThreadPoolExecutor(clients) as pool:
        return np.array(list(pool.map(timed, items)))


def _measured(run, count: int, server_pid: int, cpu_of=process_cpu_seconds) -> tuple[np.ndarray, float, float]:
    """Latencies (ms) of the `count` calls run() makes, and the CPU each call cost the client process and the
    server (ms): its process, or what cpu_of counts (tree_cpu_seconds: with its children)."""
    client0, server0 = time.process_time(), cpu_of(server_pid)
    latencies = run()
    client, server = time.process_time() - client0, cpu_of(server_pid) - server0
    return latencies, client / count * 1000, server / count * 1000


def _grpc_request(number: str, index: int) -> bytes:
    """The ModelInferRequest for one number, serialized as the client sends it."""
    from tritonclient.grpc import service_pb2 as pb

    request = pb.ModelInferRequest(model_name="speller", id=str(index))
    request.inputs.add(name="tokens", datatype="INT64", shape=[1, len(number)])
    request.raw_input_contents.append(np.array(encode_number(number), np.int64).tobytes())
    request.inputs.add(name="max_output_tokens", datatype="INT64", shape=[1])
    request.raw_input_contents.append(np.array([16], np.int64).tobytes())
    return request.SerializeToString()


def _run_grpc(port: int, requests: list[bytes], clients: int) -> np.ndarray:
    """Latencies (ms) of unary ModelInfer calls from the native load generator, `clients` in flight; a
    failed call raises."""
    latencies = np.array(_loadgen.unary(f"127.0.0.1:{port}", MODEL_INFER, requests, clients, 60.0)) * 1000
    if np.isnan(latencies).any():
        raise RuntimeError(f"{int(np.isnan(latencies).sum())} gRPC calls failed")
    return latencies


def kernel_seconds(port: int) -> float:
    """The server's time inside the models' compute so far (its /metrics counter)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("cellserve_kernel_seconds_total"))


def _measured_phase(server: ServeProcess, run, n: int) -> dict:
    """Latencies and CPU per request (client, server, server outside the kernels) of one phase: run() sends
    n requests to `server` and returns their latencies."""
    kernel0 = kernel_seconds(server.port)  # (the /metrics scrape outside the phase's CPU)
    client0, server0 = time.process_time(), process_cpu_seconds(server.pid)
    latencies = run()
    server_cpu = process_cpu_seconds(server.pid) - server0
    return {"latencies": latencies, "client_cpu_ms": (time.process_time() - client0) / n * 1000,
            "server_cpu_ms": server_cpu / n * 1000,
            "server_outside_kernels_us": (server_cpu - (kernel_seconds(server.port) - kernel0)) / n * 1e6}


PROTOCOLS = (("http", "HTTP JSON"), ("binary", "HTTP binary"), ("grpc", "gRPC"))


def _median_of_rounds(rounds: list[dict]) -> dict:
    """One phase measured in several rounds: every round's latencies, the median of each CPU figure, and the
    outside-kernels figure of every round (on a shared 2-core host one round can move by half)."""
    cpu = ("client_cpu_ms", "server_cpu_ms", "server_outside_kernels_us")
    return {"latencies": np.concatenate([r["latencies"] for r in rounds]),
            **{key: float(np.median([r[key] for r in rounds])) for key in cpu},
            "outside_kernels_rounds_us": [r["server_outside_kernels_us"] for r in rounds]}


def run(requests: int = 400, concurrency=(1, 16), seed: int = 0, json_path=None,
        triton_env: str = ".venv-triton", rounds: int = 1) -> list[dict]:
    """rounds: every phase that many times, the phases of one round after another (so a slow spell of the host
    falls on all of them); the CPU figures are the rounds' medians, the percentiles over all their requests."""
    rng = np.random.default_rng(seed)
    numbers = [str(n) for n in rng.integers(0, MAX_NUMBER + 1, requests)]
    native = http_frontend_of(None) == "native" or (_loadgen is not None and NATIVE_GRPC)
    frontends = ["native", "python"] if native else ["python"]
    protocols = [p for p in PROTOCOLS if p[0] != "grpc" or _loadgen is not None]
    if not native:
        console.print("this build has no native front ends (grpc++ or Boost were missing): their rows are skipped")
    rows = []
    with contextlib.ExitStack() as started:
        servers = {f: started.enter_context(ServeProcess(frontend=f)) for f in frontends}
        port = servers[frontends[0]].port
        with limit_threads(1):
            engine = Engine(make_runner(load_default(), 1024), "cellular", max_batch=64).start()

            def in_process(n):
                engine.submit({"tokens": encode_number(n), "max_output_tokens": 16}).result()

            floor_port = free_port()  # answers the server's own response to a typical request, at once
            sample = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            sample.request("POST", "/v2/models/speller/infer", body=_infer_body(numbers[0]),
                           headers={"Content-Type": "application/json"})
            floor = multiprocessing.get_context("spawn").Process(target=_floor_server,
                                                                 args=(floor_port, sample.getresponse().read()),
                                                                 daemon=True)
            floor.start()
            _wait_listening(floor_port)
            sent = {"http": [_http_request(n) for n in numbers], "binary": [_http_request(n, True) for n in numbers],
                    "grpc": [_grpc_request(n, i) for i, n in enumerate(numbers)]}

            def phase(f: str, protocol: str, count: int):
                server = servers[f]
                if protocol == "grpc":
                    return lambda: _run_grpc(server.grpc_port, sent["grpc"][:count], clients)
                return lambda: _run_http(server.port, sent[protocol][:count], clients)

            for clients in concurrency:
                _run(in_process, numbers[:20], clients)  # warm-up
                _run_http(floor_port, sent["http"][:20], clients)
                for f in frontends:
                    for protocol, _ in protocols:
                        phase(f, protocol, 20)()
                local, alone, runs = [], [], {(f, p): [] for f in frontends for p, _ in protocols}
                with StolenTime() as stolen:
                    for _ in range(rounds):
                        local.append(_run(in_process, numbers, clients))
                        alone.append(_run_http(floor_port, sent["http"], clients))
                        for (f, p), done in runs.items():
                            done.append(_measured_phase(servers[f], phase(f, p, requests), requests))
                local, alone = np.concatenate(local), np.concatenate(alone)
                measured = {key: _median_of_rounds(done) for key, done in runs.items()}
                row = {"clients": clients, "requests": requests, "rounds": rounds, "steal_share": stolen.share}
                for q in (50, 99):
                    row[f"engine_p{q}_ms"] = float(np.percentile(local, q))
                    row[f"floor_p{q}_ms"] = float(np.percentile(alone, q))
                for (f, p), m in measured.items():
                    row.update({f"{p}_{f}_client_cpu_ms": m["client_cpu_ms"], f"{p}_{f}_server_cpu_ms": m["server_cpu_ms"],
                                f"{p}_{f}_server_outside_kernels_us": m["server_outside_kernels_us"],
                                f"{p}_{f}_outside_kernels_rounds_us": m["outside_kernels_rounds_us"]})
                    for q in (50, 99):
                        row[f"{p}_{f}_p{q}_ms"] = float(np.percentile(m["latencies"], q))
                        row[f"{p}_{f}_overhead_p{q}_ms"] = row[f"{p}_{f}_p{q}_ms"] - row[f"engine_p{q}_ms"]
                rows.append(row)
            engine.stop()
            floor.terminate()
    table = [{"clients": row["clients"], "frontend": f, "protocol": label, "engine_p50_ms": row["engine_p50_ms"],
              **{key: row[f"{p}_{f}_{key}"] for key in ("p50_ms", "overhead_p50_ms", "p99_ms", "overhead_p99_ms",
                                                        "server_cpu_ms", "server_outside_kernels_us", "client_cpu_ms")},
              "floor_p50_ms": row["floor_p50_ms"], "steal_share": row["steal_share"]}
             for row in rows for f in frontends for p, label in protocols]
    print_table("server overhead: the speller in-process vs over loopback HTTP (JSON and binary tensors) and gRPC, on "
                "the native and the Python front ends", table,
                [("clients", "clients"), ("frontend", "front end"), ("protocol", "wire"), ("engine_p50_ms", "engine p50"),
                 ("p50_ms", "p50"), ("overhead_p50_ms", "+p50 ms"), ("p99_ms", "p99"), ("overhead_p99_ms", "+p99 ms"),
                 ("server_cpu_ms", "server CPU ms/req"), ("server_outside_kernels_us", "outside kernels us/req"),
                 ("client_cpu_ms", "client CPU ms/req"), ("floor_p50_ms", "HTTP client alone p50"),
                 ("steal_share", "CPU stolen")],
                caption="servers in processes of their own (native: `serve`, python: `serve --frontend python`, the same "
                        "models); +p50 / +p99: over the engine in-process; HTTP clients are connections on one event "
                        "loop here, gRPC clients the native load generator's calls in flight, in-process clients one "
                        "thread each; CPU per request: each process's user + system time over the phase / requests (all "
                        "share 2 cores; with --rounds, the rounds' median); outside kernels: the server's CPU less its "
                        "models' compute time (/metrics cellserve_kernel_seconds); HTTP client alone = the HTTP client "
                        "against a server that answers at once; CPU stolen = the hypervisor's share of the machine's CPU "
                        "time during the row")
    vad = silero_rows(concurrency, max(requests, 4000), triton_env)
    write_json(json_path, {"rows": rows, "table": table, "silero": vad})
    console.print("done")
    return rows


def _silero_requests(model: str, count: int, clients: int, phase: str, server_state: bool) -> list[bytes]:
    """`count` ModelInferRequests of one 32 ms chunk of Silero VAD. server_state: client k's chunks are
    session `phase-k`, the server holding state and context; otherwise each carries its context and state,
    as a stateless deployment (Triton's) needs."""
    from tritonclient.grpc import service_pb2 as pb

    from cellserve.bench.streams import CHUNK, CONTEXT, _audio

    audio = _audio(clients, (count // clients + 1) * (CHUNK + CONTEXT), 0)
    messages = []
    for i in range(count):
        k, at = i % clients, (i // clients) * CHUNK
        request = pb.ModelInferRequest(model_name=model, id=str(i))
        if server_state:
            request.inputs.add(name="input", datatype="FP32", shape=[1, CHUNK])
            request.raw_input_contents.append(audio[k, at:at + CHUNK].tobytes())
            request.parameters["sequence_id"].string_param = f"{phase}-{k}"
            request.parameters["sequence_start"].bool_param = i < clients
        else:
            request.inputs.add(name="input", datatype="FP32", shape=[1, CHUNK + CONTEXT])
            request.raw_input_contents.append(audio[k, at:at + CHUNK + CONTEXT].tobytes())
            request.inputs.add(name="state", datatype="FP32", shape=[1, 2, 128])
            request.raw_input_contents.append(np.zeros((1, 2, 128), np.float32).tobytes())
        messages.append(request.SerializeToString())
    return messages


def silero_rows(concurrency, requests: int, triton_env) -> list[dict]:
    """Silero VAD, one chunk per unary ModelInfer from the native load generator, `clients` calls in flight:
    cellserve's cellular deployment (each client a session the server holds; on the native front end its
    lane answers without Python) on both gRPC front ends, beside Triton (the nvidia-pytriton wheel's
    tritonserver, ONNX Runtime in its Python backend under dynamic batching up to 64, the client sending
    context and state with every chunk). Requests per second, latency, and the server's CPU per request
    (with its children: Triton's model runs in its backend's stub)."""
    import tempfile
    from pathlib import Path

    from cellserve.bench.common import tree_cpu_seconds
    from cellserve.bench.streams import TritonServer, _repository, silero_file

    if _loadgen is None:
        return []
    path, rows = silero_file(), []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as started:
        _repository(Path(tmp), path)
        servers = {f"cellserve {f}": (started.enter_context(ServeProcess(Path(tmp), f)), "vad-cellular", True)
                   for f in (["native", "python"] if NATIVE_GRPC else ["python"])}
        try:
            triton = started.enter_context(TritonServer(Path(triton_env), Path(started.enter_context(
                tempfile.TemporaryDirectory())), path))
            servers["triton"] = (triton, "vad", False)
        except RuntimeError as exc:
            console.print(f"Silero VAD rows without Triton: {exc}")
        for clients in concurrency:
            for name, (server, model, server_state) in servers.items():
                _run_grpc(server.grpc_port, _silero_requests(model, 200, clients, f"warm{clients}", server_state),
                          clients)
                messages = _silero_requests(model, requests, clients, f"run{clients}", server_state)
                with StolenTime() as stolen:
                    start = time.perf_counter()
                    latencies, client_ms, server_ms = _measured(
                        lambda: _run_grpc(server.grpc_port, messages, clients), requests, server.pid, tree_cpu_seconds)
                    wall = time.perf_counter() - start
                rows.append({"server": name, "clients": clients, "requests": requests,
                             "requests_per_s": requests / wall, "p50_ms": float(np.percentile(latencies, 50)),
                             "p99_ms": float(np.percentile(latencies, 99)), "server_cpu_ms": server_ms,
                             "client_cpu_ms": client_ms, "steal_share": stolen.share})
    print_table("Silero VAD over gRPC, one 32 ms chunk per ModelInfer", rows,
                [("server", "server"), ("clients", "clients"), ("requests_per_s", "req/s"), ("p50_ms", "p50 ms"),
                 ("p99_ms", "p99 ms"), ("server_cpu_ms", "server CPU ms/req"), ("client_cpu_ms", "client CPU ms/req"),
                 ("steal_share", "CPU stolen")],
                caption="cellserve: vad-cellular, each client a session held by the server (sequence_id); Triton: "
                        "the nvidia-pytriton wheel's tritonserver, ONNX Runtime in its Python backend, dynamic "
                        "batching up to 64, context and state sent with each chunk; calls in flight = clients, from "
                        "the native load generator; server CPU includes the server's child processes")
    return rows
