"""`cellserve demo`: start the server on the embedded models, spell some numbers over HTTP, stream a
session of audio-like frames, send a burst of concurrent requests, print latency percentiles, compare
batching policies on the same trace in-process, and stop the server."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

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


def run(seed: int = 0, rate: float = 1500.0) -> dict:
    from cellserve.server.app import create_app
    from cellserve.server.background import BackgroundServer
    from cellserve.server.repository import Repository

    rng = np.random.default_rng(seed)
    repository = Repository.defaults()
    with limit_threads(1), BackgroundServer(create_app(repository)) as server:
        base = server.url
        console.print(f"[bold]cellserve demo[/]: serving {sorted(repository.models)} at {base} "
                      f"(Open Inference Protocol v2; metrics at {base}/metrics)\n")
        http = httpx.Client(base_url=base, timeout=60)

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

        total, clients = 300, 16
        console.print(f"\n3. A burst of {total} spelling requests from {clients} concurrent HTTP clients:")
        burst = [int(n) for n in rng.integers(0, MAX_NUMBER + 1, total)]

        def one(n):
            start = time.perf_counter()
            r = http.post("/v2/models/speller/infer", json=_text_request([n]))
            return (time.perf_counter() - start) * 1000, r.status_code

        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(one, burst))
        elapsed = time.perf_counter() - start
        ok = sum(code == 200 for _, code in results)
        pct = _percentiles([ms for ms, _ in results])
        console.print(f"   {ok}/{total} answered in {elapsed:.2f} s ({total / elapsed:.0f} req/s); latency "
                      f"p50 {pct['p50_ms']:.1f} ms, p90 {pct['p90_ms']:.1f} ms, p99 {pct['p99_ms']:.1f} ms")
        http.close()
    console.print("   server stopped.\n")

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
    return {"examples_correct": right, "burst_ok": ok, "burst": pct, "rows": rows}
