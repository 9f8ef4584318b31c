"""`cellserve bench streams`: Silero VAD (the `silero-vad` wheel's silero_vad.onnx, 16 kHz) for S concurrent
real-time audio streams. Each stream sends a message of M ms (default 96: three 512-sample chunks) every M ms,
with a random phase; a message's latency runs from its scheduled time to its last chunk's answer. S is
swept upward until a deployment no longer sustains it (p99 <= 100 ms, nothing refused, failed or lost):

  per-stream-ort  in-process, one ONNX Runtime session per stream called per chunk by a pool of one thread
                  per core: what voice-agent frameworks do (no network);
  graph           `cellserve serve`, ONNX Runtime running the whole graph per request-level batch, the state
                  and context carried by the client (each chunk waits for the previous one's state);
  cellular        `cellserve serve`, cellular batching, state and context held by the server, front and
                  head batched per step; a message is one request whose rows are its chunks (run in order).
                  On the native gRPC front end where it was built;
  cellular-python the same on the Python gRPC front end (grpcio), the reference;
  cellular-ws     the same over WebSockets on the HTTP port (natively on the stream lanes where the native HTTP
                  front end was built, else server/websocket.py): one connection per stream, each message one
                  binary frame of its chunks' samples, answered with their probabilities; driven by the native
                  WebSocket load generator (bench/native/wsload.cpp), else an asyncio client;
  triton          Triton Inference Server (the nvidia-pytriton wheel's tritonserver), ONNX Runtime in its
                  Python backend under dynamic batching up to 64, the state carried by the client as for
                  graph: what a Triton user deploys today (bench/triton/; its environment, with numpy < 2
                  as the backend needs, comes from `make triton-env`).
graph and cellular run in a server process and are driven over one gRPC stream (ModelStreamInfer): cellular
by the native load generator (bench/native/loadgen.cpp, messages encoded before the clock starts), graph by a
grpc.aio client (each chunk needs its predecessor's answered state). Also printed: the model's ceiling (cores /
ONNX Runtime's per-chunk cost at batch 64 on the shipped file), the per-chunk cost of the model as cellserve
imports it (cellular's compute: its convs run as batched MatMuls, so it can sustain more streams than that
ceiling), the server's CPU time per message, and its memory per open session (RSS added by idle sessions). Traffic stays
on 127.0.0.1; every loop is bounded in count and time."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cellserve.progress import bar
from cellserve.bench.common import ServeProcess, StolenTime, console, print_table, tree_cpu_seconds, write_json

try:
    from cellserve.bench import _loadgen
except ImportError:  # built without grpc++: the Python client drives every deployment
    _loadgen = None
try:
    from cellserve.bench import _wsload
except ImportError:  # built without Boost.Beast: an asyncio client drives cellular-ws
    _wsload = None

SR, CHUNK, CONTEXT = 16000, 512, 64
# S swept: doublings while far from saturation, then steps of at most 1.25x up to 2048 (a deployment's sweep
# stops at its first S it does not sustain, so the fine steps cost only where they matter)
STREAMS = (8, 16, 32, 64, 80, 100, 125, 160, 200, 250, 320, 400, 500, 640, 800, 1000, 1250, 1600, 2048)
DEPLOYMENTS = ("per-stream-ort", "graph", "cellular", "cellular-python", "cellular-ws", "triton")
MODELS = {"graph": "vad-graph", "cellular": "vad-cellular", "cellular-python": "vad-cellular",
          "cellular-ws": "vad-cellular", "triton": "vad"}
TRITON_ENV = Path(".venv-triton")  # `make triton-env`
FRONTENDS = {"cellular-python": "python"}  # a deployment's gRPC front end (the default for the others)
SLO_MS = 100.0


def silero_file() -> Path:
    try:
        import silero_vad
    except ImportError:
        raise RuntimeError("bench streams needs the silero-vad wheel (pip install silero-vad): its ONNX file is "
                           "the model")
    return Path(silero_vad.__file__).parent / "data" / "silero_vad.onnx"


def _session(path: Path):
    import onnx

    from cellserve.cells.onnxruntime import ort_session

    return ort_session(onnx.load(path))


def ceiling_streams(path: Path, message_ms: int, batch: int = 64, repeats: int = 20) -> tuple[float, float]:
    """(streams the cores could serve at ONNX Runtime's batched per-chunk cost, that cost in us)."""
    session = _session(path)
    feeds = {"input": np.random.default_rng(0).standard_normal((batch, CHUNK + CONTEXT)).astype(np.float32) * 0.1,
             "state": np.zeros((2, batch, 128), np.float32), "sr": np.array(SR, np.int64)}
    session.run(None, feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    per_chunk = float(np.median(times)) / batch
    chunks_per_stream = SR / CHUNK  # per second
    return (os.cpu_count() or 1) / (per_chunk * chunks_per_stream), per_chunk * 1e6


def imported_per_chunk_us(root: Path, batch: int = 64, repeats: int = 20) -> float:
    """The same model as cellserve imports and serves it (the cellular deployment: its graph normalized, the
    LSTM on our kernels; engine/lane.py's step): us per chunk at `batch` sessions of one chunk each."""
    from cellserve.engine.lane import StreamStep
    from cellserve.server.repository import Repository

    served = Repository.from_directory(root).get("vad-cellular")
    step = StreamStep.of(served.family, served.engine.runner, served.config.policy)
    if isinstance(step, str):
        raise RuntimeError(f"Silero VAD has no lane step: {step}")
    x = np.random.default_rng(0).standard_normal((batch, 1, CHUNK + CONTEXT)).astype(np.float32) * 0.1
    counts, state = np.ones(batch, np.int32), np.zeros((batch, step.width), np.float32)
    step(x, counts, state)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(x, counts, state)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) / batch * 1e6


def _schedule(streams: int, message_ms: int, seconds: float, seed: int) -> list[tuple[float, int, int]]:
    """(time, stream, message) of every message, in time order."""
    rng = np.random.default_rng(seed)
    period = message_ms / 1000
    events = [(phase + k * period, s, k) for s, phase in enumerate(rng.uniform(0, period, streams))
              for k in range(int(seconds / period))]
    return sorted(events)


def _audio(streams: int, samples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / SR
    bursts = (np.sin(2 * np.pi * 0.5 * t) > 0)
    voices = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 250, (streams, 1)) * t) * bursts
    return (voices + 0.02 * rng.standard_normal((streams, samples))).astype(np.float32)


def _row(deployment, message_ms, streams, latencies, refused, lost, failed=0) -> dict:
    lat = np.array(latencies) * 1000
    p50 = float(np.percentile(lat, 50)) if len(lat) else None
    p99 = float(np.percentile(lat, 99)) if len(lat) else None
    return {"deployment": deployment, "message_ms": message_ms, "streams": streams, "p50_ms": p50, "p99_ms": p99,
            "refused": refused + failed, "lost": lost,
            "sustained": bool(p99 is not None and p99 <= SLO_MS and not refused and not lost and not failed)}


def run_per_stream_ort(path: Path, streams: int, message_ms: int, seconds: float, seed: int) -> dict:
    per = message_ms * SR // 1000 // CHUNK
    sessions = [_session(path) for _ in range(streams)]
    states = [np.zeros((2, 1, 128), np.float32) for _ in range(streams)]
    contexts = [np.zeros((1, CONTEXT), np.float32) for _ in range(streams)]
    schedule = _schedule(streams, message_ms, seconds, seed)
    audio = _audio(streams, (len(schedule) // streams + 2) * per * CHUNK, seed)
    latencies = []
    start = time.perf_counter()

    def message(at, s, k):
        for c in range(per):
            chunk = audio[s, (k * per + c) * CHUNK:(k * per + c + 1) * CHUNK].reshape(1, -1)
            x = np.concatenate([contexts[s], chunk], axis=1)
            _, states[s] = sessions[s].run(None, {"input": x, "state": states[s], "sr": np.array(SR, np.int64)})
            contexts[s] = x[:, -CONTEXT:]
        return time.perf_counter() - (start + at)

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        futures = []
        for at, s, k in schedule:
            delay = start + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(message, at, s, k))
        latencies = [f.result() for f in futures]
    return _row("per-stream-ort", message_ms, streams, latencies, 0, 0)


async def _drive_server(port: int, model: str, streams: int, message_ms: int, seconds: float, seed: int,
                        server_state: bool, state_shape=(2, 1, 128)) -> dict:
    """One ModelStreamInfer stream carrying every stream's chunks. server_state: the server holds state
    and context (a message's chunks go back to back); otherwise each chunk carries the state and context
    its predecessor's answer left (so it waits for it), as a tensor of state_shape (Triton's dynamic
    batching wants it batch-first)."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pbg

    per = message_ms * SR // 1000 // CHUNK
    schedule = _schedule(streams, message_ms, seconds, seed)
    audio = _audio(streams, (len(schedule) // streams + 2) * per * CHUNK, seed)
    states = [np.zeros((2, 1, 128), np.float32) for _ in range(streams)]
    contexts = [np.zeros((1, CONTEXT), np.float32) for _ in range(streams)]
    outbox: asyncio.Queue = asyncio.Queue()
    waiting: dict[str, asyncio.Future] = {}
    started_streams: set[int] = set()
    loop = asyncio.get_running_loop()
    answered, failed = {}, set()  # (stream, message) -> latency; messages with a failed chunk

    def request(s: int, k: int, c: int) -> pb.ModelInferRequest:
        """Server-held state: the whole message, its chunks as rows (c is 0). Otherwise: chunk c."""
        req = pb.ModelInferRequest(model_name=model, id=f"{s}:{k}:{c}")
        if server_state:
            chunks = audio[s, k * per * CHUNK:(k + 1) * per * CHUNK].reshape(per, CHUNK)
            req.inputs.add(name="input", datatype="FP32", shape=[per, CHUNK])
            req.raw_input_contents.append(chunks.tobytes())
            req.parameters["sequence_id"].string_param = f"stream-{s}"
            req.parameters["sequence_start"].bool_param = s not in started_streams
            started_streams.add(s)
            return req
        chunk = audio[s, (k * per + c) * CHUNK:(k * per + c + 1) * CHUNK].reshape(1, -1)
        x = np.concatenate([contexts[s], chunk], axis=1)
        contexts[s] = x[:, -CONTEXT:]
        req.inputs.add(name="input", datatype="FP32", shape=[1, CHUNK + CONTEXT])
        req.raw_input_contents.append(x.tobytes())
        req.inputs.add(name="state", datatype="FP32", shape=list(state_shape))
        req.raw_input_contents.append(states[s].tobytes())
        return req

    async def requests():
        while True:
            item = await outbox.get()
            if item is None:
                return
            yield item

    async def message(at, s, k):
        await asyncio.sleep(max(0.0, start + at - loop.time()))
        for c in range(1 if server_state else per):
            done = loop.create_future()
            waiting[f"{s}:{k}:{c}"] = done
            await outbox.put(request(s, k, c))
            reply = await done
            if reply is None:
                failed.add((s, k))
                return
            if not server_state:
                names = [o.name for o in reply.outputs]
                states[s] = np.frombuffer(reply.raw_output_contents[names.index("stateN")], np.float32).reshape(2, 1, 128)
        if (s, k) not in failed:
            answered[(s, k)] = loop.time() - (start + at)

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pbg.GRPCInferenceServiceStub(channel)
        call = stub.ModelStreamInfer(requests())

        async def read():
            async for answer in call:
                rid = answer.infer_response.id
                fut = waiting.pop(rid, None)
                if answer.error_message and rid.count(":") == 2:
                    failed.add(tuple(int(v) for v in rid.split(":")[:2]))
                if fut is not None and not fut.done():
                    fut.set_result(None if answer.error_message else answer.infer_response)

        reader = asyncio.ensure_future(read())
        start = loop.time() + 0.2
        tasks = [asyncio.ensure_future(message(at, s, k)) for at, s, k in schedule]
        await asyncio.wait(tasks, timeout=seconds + 30)
        await outbox.put(None)
        reader.cancel()
    lost = len(schedule) - len(answered) - len(failed)
    return _row("cellular" if server_state else "graph", message_ms, streams, list(answered.values()), 0, lost,
                len(failed))



def _drive_native(port: int, model: str, streams: int, message_ms: int, seconds: float, seed: int) -> dict:
    """The cellular deployment's load (the server holds state and context, so no message waits for another's
    answer) from the native load generator: every message encoded before the clock starts, sent on one
    ModelStreamInfer stream at its scheduled time, its latency running from that time to its answer."""
    from tritonclient.grpc import service_pb2 as pb

    per = message_ms * SR // 1000 // CHUNK
    schedule = _schedule(streams, message_ms, seconds, seed)
    audio = _audio(streams, (len(schedule) // streams + 2) * per * CHUNK, seed)
    messages, started = [], set()
    for i, (at, s, k) in enumerate(schedule):
        req = pb.ModelInferRequest(model_name=model, id=str(i))
        req.inputs.add(name="input", datatype="FP32", shape=[per, CHUNK])
        req.raw_input_contents.append(audio[s, k * per * CHUNK:(k + 1) * per * CHUNK].tobytes())
        req.parameters["sequence_id"].string_param = f"stream-{s}-{seed}"
        req.parameters["sequence_start"].bool_param = s not in started
        started.add(s)
        messages.append(req.SerializeToString())
    cpu = time.process_time()  # the load generator's threads are this process's
    latencies, errors = _loadgen.stream(f"127.0.0.1:{port}", messages, [at for at, _, _ in schedule], seconds + 30)
    client_cpu = time.process_time() - cpu
    latencies = np.array(latencies)
    failed = int(np.sum(errors))
    answered = latencies[~np.isnan(latencies) & ~np.array(errors, bool)]
    row = _row("cellular", message_ms, streams, list(answered), 0, int(np.isnan(latencies).sum()), failed)
    row["client_cpu_us_per_message"] = client_cpu / len(messages) * 1e6
    return row


def _ws_plan(streams: int, message_ms: int, seconds: float, seed: int) -> tuple[list, int]:
    """cellular-ws's messages: per stream, (time, binary frame of its chunks' samples); and their count."""
    per = message_ms * SR // 1000 // CHUNK
    schedule = _schedule(streams, message_ms, seconds, seed)
    audio = _audio(streams, (len(schedule) // streams + 2) * per * CHUNK, seed)
    plan: list[list[tuple[float, bytes]]] = [[] for _ in range(streams)]
    for at, s, k in schedule:
        plan[s].append((at, audio[s, k * per * CHUNK:(k + 1) * per * CHUNK].tobytes()))
    return plan, len(schedule)


def _drive_ws_native(port: int, model: str, streams: int, message_ms: int, seconds: float, seed: int) -> dict:
    """cellular-ws from the native load generator (bench/native/wsload.cpp): a WebSocket per stream, each
    message one binary frame prepared before the clock starts and sent at its scheduled time; a message's
    latency runs from that time to its answer (answers come in order on a connection)."""
    plan, count = _ws_plan(streams, message_ms, seconds, seed)
    targets = [f"/v2/models/{model}/stream?sequence_id=ws-{s}-{seed}" for s in range(streams)]
    cpu = time.process_time()  # the load generator's thread is this process's
    latencies, errors = _wsload.run("127.0.0.1", port, targets, [[m for _, m in p] for p in plan],
                                    [[at for at, _ in p] for p in plan], seconds + 30)
    client_cpu = time.process_time() - cpu
    latencies, errors = np.array(latencies), np.array(errors, bool)
    answered = latencies[~np.isnan(latencies) & ~errors]
    row = _row("cellular-ws", message_ms, streams, list(answered), 0, int(np.isnan(latencies).sum()),
               int(errors.sum()))
    row["client_cpu_us_per_message"] = client_cpu / count * 1e6
    return row


async def _drive_ws(port: int, model: str, streams: int, message_ms: int, seconds: float, seed: int) -> dict:
    """cellular-ws from an asyncio client of the `websockets` library (where the native one was not built):
    the same messages on the same schedule."""
    from websockets.asyncio.client import connect

    plan, count = _ws_plan(streams, message_ms, seconds, seed)
    loop = asyncio.get_running_loop()
    url = f"ws://127.0.0.1:{port}/v2/models/{model}/stream"
    sockets = [await connect(f"{url}?sequence_id=ws-{s}-{seed}", max_queue=None, compression=None)
               for s in range(streams)]
    latencies, failed = [], [0]
    start = loop.time() + 0.2
    deadline = start + seconds + 30

    async def send(ws, messages) -> None:
        for at, payload in messages:
            await asyncio.sleep(max(0.0, start + at - loop.time()))
            await ws.send(payload)

    async def receive(ws, messages) -> None:
        for at, _ in messages:
            answer = await asyncio.wait_for(ws.recv(), max(0.01, deadline - loop.time()))
            if isinstance(answer, str):
                failed[0] += 1
            else:
                latencies.append(loop.time() - (start + at))

    cpu = time.process_time()
    tasks = [asyncio.ensure_future(f(ws, plan[s])) for s, ws in enumerate(sockets) for f in (send, receive)]
    await asyncio.gather(*tasks, return_exceptions=True)
    client_cpu = time.process_time() - cpu
    for ws in sockets:
        await ws.close()
    lost = count - len(latencies) - failed[0]
    row = _row("cellular-ws", message_ms, streams, latencies, 0, lost, failed[0])
    row["client_cpu_us_per_message"] = client_cpu / count * 1e6
    return row


def _repository(root: Path, path: Path) -> None:
    shared = {"controls": {"sr": SR}, "max_batch": 64, "capacity": 16384, "max_sessions": 16384,
              "max_queue": 65536}
    for name, extra, shape in (("vad-graph", {"policy": "graph", "backend": "onnxruntime"}, CHUNK + CONTEXT),
                               ("vad-cellular", {"context": {"input": CONTEXT}}, CHUNK + CONTEXT)):
        folder = root / name / "1"
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_bytes(path.read_bytes())
        (root / name / "config.json").write_text(json.dumps({**shared, **extra, "input_shapes": {"input": [-1, shape]}}))


class TritonServer(ServeProcess):
    """tritonserver from a Python environment with the nvidia-pytriton wheel (and numpy < 2, onnxruntime: its
    Python backend's stub runs that environment's python3, found first on PATH), serving bench/triton/ on
    Silero VAD. As pytriton does at start, the stub for the environment's Python goes into the backend
    folder (a copy here)."""

    def __init__(self, env: Path, root: Path, onnx_file: Path):
        site = next(iter(sorted(env.glob("lib/python3.*/site-packages"))), None)
        home = site / "pytriton" / "tritonserver" if site else None
        if home is None or not (home / "bin" / "tritonserver").exists():
            raise RuntimeError(f"no tritonserver in {env}: make triton-env builds that environment")
        backends = root / "backends"
        shutil.copytree(home / "backends", backends)
        shutil.copy(home / "python_backend_stubs" / site.parent.name.removeprefix("python") /
                    "triton_python_backend_stub", backends / "python")
        model = root / "repository" / "vad"
        (model / "1").mkdir(parents=True)
        assets = Path(__file__).parent / "triton"
        shutil.copy(assets / "config.pbtxt", model)
        shutil.copy(assets / "model.py", model / "1")
        shutil.copy(onnx_file, model / "1" / "silero_vad.onnx")
        environment = {**os.environ, "PATH": f"{env.resolve() / 'bin'}:{os.environ.get('PATH', '')}",
                       "LD_LIBRARY_PATH": f"{site / 'nvidia_pytriton.libs'}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
        self._start(
            [str(home / "bin" / "tritonserver"), "--model-repository", str(root / "repository"),
             "--backend-directory", str(backends), "--http-address", "127.0.0.1", "--http-port", "{port}",
             "--grpc-address", "127.0.0.1", "--grpc-port", "{grpc_port}", "--allow-metrics", "false",
             "--log-verbose", "0"], environment)

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid)  # the model runs in the backend's stub, a child

def bytes_per_session(server: ServeProcess, sessions: int) -> float:
    """RSS the server adds for `sessions` idle sessions (each opened by one chunk and left open)."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pbg

    chunk = np.zeros((1, CHUNK), np.float32).tobytes()

    def requests(first: int, count: int):
        for s in range(first, first + count):
            req = pb.ModelInferRequest(model_name="vad-cellular", id=str(s))
            req.inputs.add(name="input", datatype="FP32", shape=[1, CHUNK])
            req.raw_input_contents.append(chunk)
            req.parameters["sequence_id"].string_param = f"idle-{s}"
            req.parameters["sequence_start"].bool_param = True
            yield req

    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = pbg.GRPCInferenceServiceStub(channel)
        for answer in stub.ModelStreamInfer(requests(0, 200)):  # warm: first-use allocations are not sessions
            pass
        time.sleep(0.5)
        before = server.rss_bytes()
        errors = sum(1 for answer in stub.ModelStreamInfer(requests(200, sessions)) if answer.error_message)
        time.sleep(0.5)
        after = server.rss_bytes()
    if errors:
        raise RuntimeError(f"{errors} of {sessions} sessions could not be opened")
    return (after - before) / sessions


def run(message_ms=(96,), streams=STREAMS, deployments=DEPLOYMENTS[:5],
        seconds: float = 5.0, idle_sessions: int = 10_000, seed: int = 0, json_path=None,
        triton_env: Path = TRITON_ENV) -> dict:
    path = silero_file()
    ceiling, per_chunk_us = ceiling_streams(path, 96)
    console.print(f"Silero VAD 16 kHz: ONNX Runtime at batch 64 takes {per_chunk_us:.1f} us per chunk; the model's "
                  f"ceiling on {os.cpu_count()} cores is {ceiling:.0f} streams")
    rows = []
    result = {"ceiling_streams": ceiling, "per_chunk_us_batch64": per_chunk_us, "rows": rows}

    def save() -> None:  # after every row: a sweep of hours that fails late keeps what it measured
        write_json(json_path, result, quiet=True)

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as servers:
        _repository(Path(tmp), path)
        ours_us = result["ours_per_chunk_us_batch64"] = imported_per_chunk_us(Path(tmp))
        console.print(f"  as cellserve imports it (1-D convs as MatMuls over the batch, the LSTM on our kernels): "
                      f"{ours_us:.1f} us per chunk, {per_chunk_us / ours_us:.1f}x less")
        started: dict = {}  # front end or "triton" -> (server, the stack that stops it)

        def server_for(deployment: str) -> ServeProcess:
            key = "triton" if deployment == "triton" else FRONTENDS.get(deployment)
            if key not in started:
                stack = servers.enter_context(contextlib.ExitStack())
                started[key] = (stack.enter_context(
                    TritonServer(Path(triton_env), Path(stack.enter_context(tempfile.TemporaryDirectory())), path)
                    if key == "triton" else ServeProcess(Path(tmp), key)), stack)
            return started[key][0]

        def retire(deployment: str) -> None:
            """A server pushed past saturation may not come back (Triton's stub gave up, losing every later
            message): the next message size gets a fresh one."""
            key = "triton" if deployment == "triton" else FRONTENDS.get(deployment)
            if key in started:
                started.pop(key)[1].close()

        with bar("streams sweep", len(deployments) * len(message_ms) * len(streams)) as shown:
            for deployment in deployments:
                for ms in message_ms:
                    for i, s in enumerate(streams):
                        shown.advance(note=f"{deployment} M={ms} ms S={s}")
                        server = None if deployment == "per-stream-ort" else server_for(deployment)
                        cpu = server.cpu_seconds() if server else 0.0
                        with StolenTime() as stolen:
                            if server is None:
                                row = run_per_stream_ort(path, s, ms, seconds, seed)
                            elif deployment == "triton":
                                row = asyncio.run(_drive_server(server.grpc_port, MODELS[deployment], s, ms, seconds,
                                                                seed, server_state=False, state_shape=(1, 2, 128)))
                            elif deployment == "cellular-ws" and _wsload is not None:
                                row = _drive_ws_native(server.port, MODELS[deployment], s, ms, seconds, seed + i)
                            elif deployment == "cellular-ws":
                                row = asyncio.run(_drive_ws(server.port, MODELS[deployment], s, ms, seconds, seed + i))
                            elif deployment != "graph" and _loadgen is not None:
                                row = _drive_native(server.grpc_port, MODELS[deployment], s, ms, seconds, seed + i)
                            else:
                                row = asyncio.run(_drive_server(server.grpc_port, MODELS[deployment], s, ms,
                                                                seconds, seed, server_state=deployment != "graph"))
                            if server is not None:
                                row["deployment"] = deployment
                                messages = s * int(seconds * 1000 / ms)
                                row["server_cpu_us_per_message"] = (server.cpu_seconds() - cpu) / messages * 1e6
                        row["steal_share"] = stolen.share
                        rows.append(row)
                        save()
                        console.print(f"  {deployment:15s} M={ms} ms S={s:5d}: p50 {row['p50_ms'] or 0:7.1f} ms, p99 "
                                      f"{row['p99_ms'] or 0:7.1f} ms, refused {row['refused']}, lost {row['lost']}"
                                      + (f", server CPU {row['server_cpu_us_per_message']:.0f} us/message"
                                         if "server_cpu_us_per_message" in row else "")
                                      + (f", client {row['client_cpu_us_per_message']:.0f}"
                                         if "client_cpu_us_per_message" in row else "")
                                      + (f", CPU stolen {stolen.share:.0%}" if stolen.share else ""))
                        if not row["sustained"]:
                            shown.advance(len(streams) - i - 1)  # larger S are skipped
                            if server is not None:
                                retire(deployment)
                            break
        retire("cellular")  # a fresh server: memory freed by the sweep's sessions would hide the idle ones'
        per_session = bytes_per_session(server_for("cellular"), idle_sessions) if idle_sessions else None
    best = {(d, ms): max([r["streams"] for r in rows if r["deployment"] == d and r["message_ms"] == ms
                          and r["sustained"]], default=0) for d in deployments for ms in message_ms}
    print_table("Largest sustained S (p99 <= 100 ms, nothing refused or lost)",
                [{"deployment": d, **{f"m{ms}": best[(d, ms)] for ms in message_ms}} for d in deployments],
                [("deployment", "deployment"), *[(f"m{ms}", f"M = {ms} ms") for ms in message_ms]],
                caption=f"model ceiling: {ceiling:.0f} streams")
    if per_session is not None:
        console.print(f"server memory per idle session (RSS added by {idle_sessions} sessions): {per_session:.0f} bytes")
    result["bytes_per_session"] = per_session
    write_json(json_path, result)
    return result
