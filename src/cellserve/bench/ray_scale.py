"""`cellserve bench ray`: requests per second through Ray Serve with 1 and with N engine shards, from
concurrent HTTP clients on loopback (bounded in count and time)."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

from cellserve.bench.common import console, print_table, write_json
from cellserve.tasks.speller import MAX_NUMBER


def run(replicas=(1, 2), requests: int = 600, clients: int = 16, json_path=None) -> list[dict]:
    import ray
    from ray import serve

    from cellserve.server.ray_serve import build

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    numbers = [str(n) for n in np.random.default_rng(0).integers(0, MAX_NUMBER + 1, requests)]
    rows = []
    ray.init(include_dashboard=False, ignore_reinit_error=True)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for n in replicas:
            serve.run(build(None, replicas=n), name="cellserve", route_prefix="/")
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60,
                              limits=httpx.Limits(max_connections=clients)) as client:
                def one(number):
                    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [number]}]}
                    start = time.perf_counter()
                    client.post("/v2/models/speller/infer", json=body).raise_for_status()
                    return (time.perf_counter() - start) * 1000

                with ThreadPoolExecutor(clients) as pool:
                    list(pool.map(one, numbers[:50]))  # warm-up
                    start = time.perf_counter()
                    latencies = np.array(list(pool.map(one, numbers)))
                    elapsed = time.perf_counter() - start
            rows.append({"replicas": n, "clients": clients, "requests": requests, "throughput_rps": requests / elapsed,
                         "p50_ms": float(np.percentile(latencies, 50)), "p99_ms": float(np.percentile(latencies, 99))})
            serve.delete("cellserve")
    finally:
        serve.shutdown()
        ray.shutdown()
    base = rows[0]["throughput_rps"]
    for row in rows:
        row["speedup"] = row["throughput_rps"] / base
    print_table("Ray Serve: speller requests from concurrent HTTP clients", rows,
                [("replicas", "shards"), ("clients", "clients"), ("throughput_rps", "req/s"), ("speedup", "x 1 shard"),
                 ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms")])
    write_json(json_path, {"rows": rows})
    console.print("done")
    return rows
