"""`cellserve demo`: the embedded number-speller served by the engine. Shows answers a person can check,
then one burst of requests through cellular batching, request-level (graph) batching and no batching."""

from __future__ import annotations

import numpy as np

from cellserve.bench.common import console, limit_threads, print_table
from cellserve.bench.loadgen import poisson_arrivals, run_load
from cellserve.engine import POLICIES, Engine, make_runner
from cellserve.models.speller import MAX_NUMBER, decode_words, encode_number, load_default, spell


def run(burst_rate: float = 400.0, burst_seconds: float = 3.0, seed: int = 0) -> dict:
    model = load_default()
    console.print(f"[bold]cellserve demo[/]: a 2-layer LSTM encoder-decoder (hidden {model.encoder.hidden_size}) "
                  "that spells numbers in words, served with cellular batching.")
    rng = np.random.default_rng(seed)
    examples = [7, 15, 300, 4096, 12345, 99017, 500000, int(rng.integers(0, MAX_NUMBER + 1))]
    with limit_threads(1):
        engine = Engine(make_runner(model, 256), "cellular", max_batch=64).start()
        futures = [engine.submit({"tokens": encode_number(str(n)), "max_output_tokens": 16}) for n in examples]
        right = 0
        for n, f in zip(examples, futures):
            words = decode_words(f.result(timeout=30)["tokens"])
            ok = words == " ".join(spell(n))
            right += ok
            console.print(f"  {n:>7} -> {words}  {'[green]correct[/]' if ok else '[red]wrong[/]'}")
        engine.stop()
        console.print(f"{right}/{len(examples)} spelled correctly.\n")

        arrivals = poisson_arrivals(burst_rate, burst_seconds, seed)
        numbers = rng.integers(0, MAX_NUMBER + 1, len(arrivals))
        requests = [{"tokens": encode_number(str(n)), "max_output_tokens": 16} for n in numbers]
        console.print(f"A burst of {len(requests)} requests at {burst_rate:.0f} req/s (Poisson), same trace per policy:")
        rows = []
        for policy in POLICIES:
            engine = Engine(make_runner(model, 1024), policy, max_batch=64, max_queue=len(requests)).start()
            result = run_load(engine, requests, arrivals, drain_s=60)
            rows.append({"policy": policy, "throughput_rps": result.throughput_rps,
                         "p50_ms": result.percentile_ms(50), "p90_ms": result.percentile_ms(90),
                         "p99_ms": result.percentile_ms(99), "completed": result.completed, "lost": result.lost})
    print_table("latency of the burst", rows,
                [("policy", "policy"), ("throughput_rps", "done/s"), ("p50_ms", "p50 ms"), ("p90_ms", "p90 ms"),
                 ("p99_ms", "p99 ms"), ("completed", "done"), ("lost", "lost")])
    cell, graph = rows[0], rows[1]
    console.print(f"Cellular batching: p90 {cell['p90_ms']:.0f} ms vs {graph['p90_ms']:.0f} ms for request-level "
                  f"batching ({graph['p90_ms'] / cell['p90_ms']:.1f}x lower), "
                  f"{cell['throughput_rps']:.0f} vs {graph['throughput_rps']:.0f} requests/s.")
    return {"examples_correct": right, "rows": rows}
