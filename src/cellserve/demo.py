"""`cellserve demo`: start the server on the embedded models (a process of its own), spell some numbers over
HTTP, stream a session of audio-like frames, send a burst of concurrent requests over HTTP and gRPC from load
generators that leave the server its cores (the bench's: requests encoded before the clock starts; 16
threads of a blocking HTTP client took most of the 2 cores and gave 498 req/s), print latency percentiles and
which front end served, compare batching policies on the same trace in-process, and stop the server."""

from __future__ import annotations

import json
import time

import httpx
import numpy as np

from cellserve.bench.common import console, limit_threads, print_table
from cellserve.bench.loadgen import poisson_arrivals, run_load
from cellserve.engine import POLICIES, Engine
from cellserve.families import make_runner
from cellserve.tasks.speller import MAX_NUMBER, encode_number, spell


def _text_request(numbers) -> dict:
    return {"inputs": [{"name": "text", "shape": [len(numbers)], "datatype": "BYTES",
                        "data": [str(n) for n in numbers]}]}


def _loadgen_built() -> bool:
    try:
        from cellserve.bench import _loadgen  # noqa: F401
    except ImportError:
        return False
    return True


def _percentiles(latencies_ms) -> dict:
    return {f"p{q}_ms": float(np.percentile(latencies_ms, q)) for q in (50, 90, 99)}


def saturated_throughput(model, policy: str, rng, count: int = 2000) -> float:
    """Requests per second a policy finishes with a backlog always waiting (all queued at once): the most it
    can sustain, to place a load relative to it."""
    requests = [{"tokens": encode_number(str(n)), "max_output_tokens": 16} for n in rng.integers(0, MAX_NUMBER + 1, count)]
    engine = Engine(make_runner(model, 1024), policy, max_batch=64, max_queue=count).start()
    start = time.perf_counter()
    for f in [engine.submit(r) for r in requests]:
        f.result()
    engine.stop()
    return count / (time.perf_counter() - start)


def _burst_http_request(number: int) -> bytes:
    body = json.dumps(_text_request([number])).encode()
    return (b"POST /v2/models/speller/infer HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body))


def _burst_grpc_request(number: int, index: int) -> bytes:
    from tritonclient.grpc import service_pb2 as pb

    request = pb.ModelInferRequest(model_name="speller", id=str(index))
    request.inputs.add(name="text", datatype="BYTES", shape=[1])
    text = str(number).encode()
    request.raw_input_contents.append(len(text).to_bytes(4, "little") + text)
    return request.SerializeToString()


def run(seed: int = 0, rate: float = 1500.0) -> dict:
    from cellserve.bench.common import ServeProcess
    from cellserve.bench.http import _run_grpc, _run_http
    from cellserve.server.repository import Repository

    rng = np.random.default_rng(seed)
    with ServeProcess() as server:
        base = f"http://127.0.0.1:{server.port}"
        http = httpx.Client(base_url=base, timeout=60)
        meta = http.get("/v2").json()
        console.print(f"[bold]cellserve demo[/]: serving {sorted(m['name'] for m in http.post('/v2/repository/index').json())} "
                      f"at {base} (Open Inference Protocol v2; metrics at {base}/metrics), gRPC on port "
                      f"{server.grpc_port}\n")

        numbers = [7, 15, 300, 4096, 12345, 99017, 500000, int(rng.integers(0, MAX_NUMBER + 1))]
        reply = http.post("/v2/models/speller/infer", json=_text_request(numbers)).json()
        words = next(o for o in reply["outputs"] if o["name"] == "text")["data"]
        right = sum(w == " ".join(spell(n)) for n, w in zip(numbers, words))
        console.print("1. The speller (an LSTM encoder-decoder) answers one batched request:")
        for n, w in zip(numbers, words):
            console.print(f"   {n:>7} -> {w}  {'[green]correct[/]' if w == ' '.join(spell(n)) else '[red]wrong[/]'}")
        console.print(f"   {right}/{len(numbers)} correct.\n")

        console.print("2. A streaming session on sru-stream (40 features per 10 ms frame, blocks of 4 frames):")
        frames = rng.standard_normal((100, 40)).astype(np.float32)
        cuts = [0, 23, 50, 61, 100]
        for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
            start = time.perf_counter()
            body = {"inputs": [{"name": "frames", "shape": [b - a, 40], "datatype": "FP32",
                                "data": frames[a:b].reshape(-1).tolist()}],
                    "parameters": {"sequence_id": "demo-stream", "sequence_start": i == 0, "sequence_end": b == 100}}
            out = http.post("/v2/models/sru-stream/infer", json=body).json()
            shape = out["outputs"][0]["shape"]
            console.print(f"   chunk {i + 1}: {b - a:3d} frames in -> {shape[0]:3d} outputs of {shape[1]}, "
                          f"{out['parameters']['frames_pending']} frame(s) wait for a full block "
                          f"({(time.perf_counter() - start) * 1000:.1f} ms)")
        http.close()

        total, clients = 2000, 16
        burst = [int(n) for n in rng.integers(0, MAX_NUMBER + 1, total)]
        console.print(f"\n3. A burst of {total} spelling requests (text in, words out) from {clients} clients in flight; "
                      "the clients are load generators (requests encoded before the clock starts), so they take "
                      "little of the server's 2 cores:")
        http_front = ("the native front end (Boost.Beast; the speller's requests never reach Python)"
                      if meta.get("http_frontend") == "native" else "the Python front end (uvicorn, FastAPI)")
        wires = [("HTTP", http_front, "keep-alive connections on one event loop",
                  lambda: _run_http(server.port, [_burst_http_request(n) for n in burst], clients))]
        if meta.get("grpc_frontend") == "native" and _loadgen_built():
            wires.append(("gRPC", "the native front end (grpc++; the speller's requests never reach Python)",
                          "the native load generator",
                          lambda: _run_grpc(server.grpc_port, [_burst_grpc_request(n, i) for i, n in enumerate(burst)],
                                            clients)))
        bursts = {}
        for wire, front, client, send in wires:
            cpu0, start = time.process_time(), time.perf_counter()
            latencies = send()
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
            pct = bursts[wire] = {**_percentiles(latencies), "rps": total / elapsed}
            console.print(f"   {wire:4s} {total} answered in {elapsed:.2f} s ({total / elapsed:.0f} req/s); latency p50 "
                          f"{pct['p50_ms']:.1f} ms, p90 {pct['p90_ms']:.1f} ms, p99 {pct['p99_ms']:.1f} ms; served by "
                          f"{front}; client: {client}, {cpu / total * 1e6:.0f} us of CPU per request")
    console.print("   server stopped.\n")

    repository = Repository.defaults()
    model = repository.get("speller").model
    with limit_threads(1):
        graph_max = saturated_throughput(model, "graph", rng)
        loads = [rate, round(0.75 * graph_max, -1)]
        console.print(f"4. Seeded Poisson traces through each batching policy, in-process: the demo's load "
                      f"({loads[0]:.0f} req/s) and 3/4 of what request-level batching (graph) serves when "
                      f"saturated ({graph_max:.0f} req/s -> {loads[1]:.0f} req/s); 3 s each:")
        rows = []
        for load in loads:
            arrivals = poisson_arrivals(load, 3.0, seed)
            requests = [{"tokens": encode_number(str(n)), "max_output_tokens": 16}
                        for n in rng.integers(0, MAX_NUMBER + 1, len(arrivals))]
            for policy in POLICIES if load == loads[0] else ("cellular", "graph"):
                engine = Engine(make_runner(model, 1024), policy, max_batch=64, max_queue=len(requests)).start()
                for f in [engine.submit(r) for r in requests[:64]]:  # warm caches before the timed trace
                    f.result()
                result = run_load(engine, requests, arrivals, drain_s=60)
                rows.append({"load_rps": load, "policy": policy, "throughput_rps": result.throughput_rps,
                             "p50_ms": result.percentile_ms(50), "p90_ms": result.percentile_ms(90),
                             "p99_ms": result.percentile_ms(99), "completed": result.completed, "lost": result.lost})
    print_table("latency by batching policy", rows,
                [("load_rps", "offered/s"), ("policy", "policy"), ("throughput_rps", "done/s"), ("p50_ms", "p50 ms"),
                 ("p90_ms", "p90 ms"), ("p99_ms", "p99 ms"), ("completed", "done"), ("lost", "lost")])
    for load in loads:
        cell, graph = (next(r for r in rows if r["load_rps"] == load and r["policy"] == p) for p in ("cellular", "graph"))
        ahead = all(cell[k] < graph[k] for k in ("p50_ms", "p90_ms", "p99_ms"))
        console.print(f"At {load:.0f} req/s cellular batching {'is ahead of' if ahead else 'does not lead'} "
                      f"request-level batching: p50 {cell['p50_ms']:.1f} vs {graph['p50_ms']:.1f} ms, p90 "
                      f"{cell['p90_ms']:.1f} vs {graph['p90_ms']:.1f} ms, p99 {cell['p99_ms']:.1f} vs "
                      f"{graph['p99_ms']:.1f} ms.")
    none = next(r for r in rows if r["policy"] == "none")
    console.print(f"No batching keeps up with {none['throughput_rps']:.0f} of {rate:.0f} req/s.")
    return {"examples_correct": right, "bursts": bursts, "rows": rows}
