"""`cellserve bench serving`: one seeded open-loop trace per offered rate, run through the cellular,
graph and none policies of the same engine; latency percentiles, throughput, refusals and losses,
a summary of the targets, and a latency-vs-throughput plot per workload. With several step loops, the
first runs every policy and the others run cellular, for the loop-against-loop ratio."""

from __future__ import annotations


import time
from pathlib import Path

import numpy as np

from cellserve.progress import bar
from cellserve.bench.common import StolenTime, console, limit_threads, print_table, write_json
from cellserve.bench.loadgen import poisson_arrivals, run_load
from cellserve.bench.workloads import WORKLOADS, sentence_lengths
from cellserve.engine import POLICIES, Engine

SLO_P99_MS = 1000.0


def sustained(row: dict) -> bool:
    """The policy kept up: nothing refused, failed or lost, and p99 under the 1 s objective."""
    return (row["refused"] == 0 and row["failed"] == 0 and row["lost"] == 0 and row["p99_ms"] is not None
            and row["p99_ms"] < SLO_P99_MS)


def unbatched_capacity(workload, model, seed: int, samples: int = 8) -> float:
    """Requests per second one request at a time can serve (to place the rate grid)."""
    rng = np.random.default_rng(seed + 99)
    engine = Engine(workload.runner(model, "none", 4096), "none").start()
    requests = [workload.make_request(rng, int(n)) for n in sentence_lengths(rng, samples)]
    engine.submit(requests[0]).result()  # warm-up
    start = time.perf_counter()
    for r in requests:
        engine.submit(r).result()
    engine.stop()
    return samples / (time.perf_counter() - start)


def rate_grid(base: float) -> list[float]:
    """The coarse grid: from half the unbatched capacity, doubling."""
    return [round(base * m, 1) for m in (0.5, 1, 2, 4, 8, 16, 32, 64)]


def refine(rows: list[dict], policy: str, step: float = 1.25) -> list[float]:
    """Rates between a policy's highest sustained rate and the next rate it failed, at most `step` apart,
    so its maximum sustained rate is located within that factor."""
    mine = sorted((r["rate_rps"], r["sustained"]) for r in rows if r["policy"] == policy)
    ok = [rate for rate, good in mine if good]
    if not ok:
        return []
    above = [rate for rate, good in mine if not good and rate > max(ok)]
    if not above:
        return []
    lo, hi = max(ok), min(above)
    n = int(np.ceil(np.log(hi / lo) / np.log(step)))
    return [round(lo * (hi / lo) ** (i / n), 1) for i in range(1, n)]


MIN_REQUESTS = 200  # arrivals per rate and policy at least: the p90 of each rests on 20 or more of them


def run(workloads=tuple(WORKLOADS), policies=POLICIES, rates=None, duration: float = 8.0, seed: int = 0,
        max_batch: int = 64, max_delay_ms: float = 5.0, buckets=(), json_path=None, plot_dir=None,
        backends=("cellserve",), tune_gc: bool = True, step_loops=("native", "python"),
        min_requests: int = MIN_REQUESTS, repeats: int = 1) -> list[dict]:
    """duration: seconds of arrivals per rate, longer where that brings fewer than min_requests (a p90 over
    ~35 requests is noise: one light-load trace of seq2seq gave cellular/graph 1.14, then 0.47). repeats: each
    rate runs this many traces (seeds seed, seed+1, ...), every policy on each before the next, and a row holds
    their medians (merged_row): one slow spell of a shared host then moves one vote, not the row. backends: who
    runs the cells; 'onnxruntime' adds rows with ORT executing the LSTM layers, 'cellserve-bf16' rows with our
    kernels on bf16 weights. Without
    explicit rates, a coarse doubling grid runs until every policy saturates, then each of cellular and
    graph is refined near its saturation (steps of at most 1.25x; graph's points run both policies, since
    their latencies are compared there)."""
    def seconds(rate: float) -> float:
        return max(duration, min_requests / rate)

    def measure(workload, model, policies_and_loops, backend, rate) -> list[dict]:
        """A row per (policy, loop): the medians of `repeats` traces, interleaved across the policies."""
        runs = {run: [] for run in policies_and_loops}
        for k in range(repeats):
            for policy, loop in policies_and_loops:
                runs[(policy, loop)].append(_measure(workload, model, policy, backend, rate, seconds(rate),
                                                     seed + k, max_batch, max_delay_ms, buckets, tune_gc, loop))
        return [merged_row(found) for found in runs.values()]

    rows = []
    with limit_threads(1):
        for name in workloads:
            workload = WORKLOADS[name]
            models = {"cellserve": workload.make_model()}
            if "onnxruntime" in backends and name not in ("treelstm", "speller", "imported"):  # no TreeLSTM operator
                from cellserve.interop.onnx_export import use_onnxruntime

                models["onnxruntime"] = use_onnxruntime(workload.make_model())
            if "cellserve-bf16" in backends:  # the same model with bf16 weight matrices (weight_dtype: bf16)
                from cellserve.compress.quantize import bf16_weights

                models["cellserve-bf16"] = bf16_weights(models["cellserve"])
            base = unbatched_capacity(workload, models["cellserve"], seed)
            grid = list(rates) if rates else rate_grid(base)
            console.print(f"[bold]{name}[/]: {workload.description}; unbatched capacity ~{base:.1f} req/s; "
                          f"rates {grid}")
            loops = distinct_loops(workload, models["cellserve"], step_loops)
            runs = [(p, b, loops[0]) for b in models for p in policies]
            runs += [("cellular", "cellserve", loop) for loop in loops[1:] if "cellular" in policies]
            mine: list[dict] = []
            saturated = {run: 0 for run in runs}
            with bar(f"{name} sweep", len(grid) * len(runs)) as shown:
                for rate in grid:
                    for backend in models:
                        # saturated twice already: higher rates tell nothing new
                        due = [(p, loop) for p, b, loop in runs if b == backend and saturated[(p, b, loop)] < 2]
                        shown.advance(len([r for r in runs if r[1] == backend]), note=f"{rate:g} req/s {backend}")
                        for row in measure(workload, models[backend], due, backend, rate) if due else []:
                            saturated[(row["policy"], backend, row["asked_loop"])] += 0 if row["sustained"] else 1
                            mine.append(row)
                    if all(v >= 2 for v in saturated.values()):
                        shown.advance((len(grid) - grid.index(rate) - 1) * len(runs))
                        break
                if not rates:
                    refined = [(p, loops[0]) for p in ("graph", "cellular") if p in policies]
                    refined += [("cellular", loop) for loop in loops[1:] if "cellular" in policies]
                    for target, loop in refined:
                        extra = refine([r for r in mine if r["backend"] == "cellserve" and r["asked_loop"] == loop], target)
                        also = [p for p in ("cellular", "graph") if p in policies] if target == "graph" else [target]
                        shown.grow(len(extra) * len(also))
                        for rate in extra:
                            shown.advance(len(also), note=f"refining {rate:g} req/s {target} {loop}")
                            mine += measure(workload, models["cellserve"], [(p, loop) for p in also], "cellserve",
                                            rate)
            rows += sorted(mine, key=lambda r: (r["backend"], r["rate_rps"], POLICIES.index(r["policy"])))
    columns = [("workload", "workload"), ("policy", "policy"), ("backend", "backend"), ("step_loop", "loop"),
               ("rate_rps", "offered/s"),
               ("throughput_rps", "done/s"), ("p50_ms", "p50 ms"), ("p90_ms", "p90 ms"), ("p99_ms", "p99 ms"),
               ("mean_batch", "mean batch"), ("overhead_us", "overhead us/step"),
               ("overhead_share", "overhead share"), ("padding_share", "padded rows"), ("completed", "done"), ("refused", "refused"),
               ("failed", "failed"), ("lost", "lost"), ("steal_share", "CPU stolen")]
    print_table("serving: open-loop Poisson load, same trace per rate", rows, columns,
                caption="overhead = the engine's time per step outside the model's kernels (admission, "
                        "bookkeeping, retiring); share = of the steps' wall time; padded rows = share of the "
                        "rows computed that were padding; CPU stolen = the hypervisor's share of the machine's "
                        "CPU time during the rate (another guest's: that row ran on a slower machine)")
    summary = summarize(rows)
    print_table("targets: cellular vs graph", summary,
                [("workload", "workload"), ("max_sustained_cellular", "cellular max/s"),
                 ("max_sustained_graph", "graph max/s"), ("max_sustained_none", "none max/s"),
                 ("max_sustained_cellular_python", "cellular python-loop max/s"),
                 ("native_over_python", "native/python loop"),
                 ("throughput_ratio", "cellular/graph thr"), ("worst_p90_ratio", "worst p90 cell/graph"),
                 ("p90_ratio_near_saturation", "worst p90 cell/graph >= 0.75 graph max"),
                 ("light_p99_over_p90", "light-load p99/p90 cellular"), ("lost", "lost")],
                caption="sustained = p99 < 1 s with nothing refused, failed or lost; p90 ratios over the rates "
                        "graph sustains (all, and from three quarters of its maximum up)")
    write_json(json_path, {"rows": rows, "summary": summary})
    if plot_dir:
        plot(rows, Path(plot_dir))
    return rows


def distinct_loops(workload, model, step_loops) -> list[str]:
    """The step loops to run: those that give this workload a different runner (a family without a native
    loop runs its Python one whatever is asked)."""
    seen, out = set(), []
    for loop in step_loops:
        actual = workload.runner(model, "cellular", 16, loop).step_loop
        if actual not in seen:
            seen.add(actual)
            out.append(loop)
    return out


def _measure(workload, model, policy, backend, rate, duration, seed, max_batch, max_delay_ms, buckets,
             tune_gc=True, step_loop="native") -> dict:
    """One policy at one offered rate: the same seeded trace for every policy."""
    arrivals = poisson_arrivals(rate, duration, seed)
    rng = np.random.default_rng(seed)
    requests = [workload.make_request(rng, int(n)) for n in sentence_lengths(rng, len(arrivals))]
    # graph batches whole requests; a cellular step's rows are nodes (16 per tree)
    step_rows = max_batch * (workload.rows_per_request if policy == "cellular" else 1)
    runner = workload.runner(model, policy, 16384 if workload.name == "treelstm" else 4096, step_loop)
    engine = Engine(runner, policy,
                    max_batch=step_rows, max_queue=4 * max_batch + int(rate), max_delay_ms=max_delay_ms,
                    length_buckets=buckets, max_running=workload.running_per_batch * max_batch,
                    tune_gc=tune_gc).start()
    with StolenTime() as stolen:
        result = run_load(engine, requests, arrivals, drain_s=max(5.0, duration))
    stats = engine.stats
    row = {"workload": workload.name, "policy": policy, "backend": backend, "step_loop": engine.step_loop,
           "asked_loop": step_loop, "rate_rps": rate,
           "throughput_rps": result.throughput_rps, "p50_ms": result.percentile_ms(50),
           "p90_ms": result.percentile_ms(90), "p99_ms": result.percentile_ms(99),
           "completed": result.completed, "refused": result.refused, "failed": result.failed,
           "lost": result.lost, "mean_batch": _mean_batch(engine),
           "overhead_us": stats.overhead_s / stats.steps * 1e6 if stats.steps else None,
           "overhead_share": stats.overhead_s / stats.step_s if stats.step_s else None,
           "padding_share": stats.rows_padded / stats.rows_run if stats.rows_run else None,
           "steal_share": stolen.share}
    row["sustained"] = sustained(row)
    console.print(f"  {policy:8s} {backend:11s} {engine.step_loop:6s} {rate:8.1f} req/s -> {row['throughput_rps']:7.1f} done/s, "
                  f"p90 {_ms(row['p90_ms'])}, p99 {_ms(row['p99_ms'])}, refused {row['refused']}, "
                  f"failed {row['failed']}, lost {row['lost']}, overhead {_us(row['overhead_us'])}/step"
                  + (f", CPU stolen {stolen.share:.0%}" if stolen.share else ""))
    return row


MEDIANS = ("throughput_rps", "p50_ms", "p90_ms", "p99_ms", "refused", "failed", "mean_batch", "overhead_us",
           "overhead_share", "padding_share", "steal_share")


def merged_row(rows: list[dict]) -> dict:
    """One row from repeated traces of a policy at a rate: the median of each figure (refusals and failures
    included), every request counted (completed, lost: one lost request anywhere counts), and sustained
    judged on the medians. p90_ms_each keeps each trace's p90."""
    if len(rows) == 1:
        return rows[0]
    row = dict(rows[0])
    for key in MEDIANS:
        values = [r[key] for r in rows if r[key] is not None]
        row[key] = float(np.median(values)) if values else None
    row["completed"], row["lost"] = sum(r["completed"] for r in rows), sum(r["lost"] for r in rows)
    row["repeats"], row["p90_ms_each"] = len(rows), [r["p90_ms"] for r in rows]
    row["sustained"] = sustained(row)
    return row


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for name in dict.fromkeys(r["workload"] for r in rows):
        ours = [r for r in rows if r["workload"] == name and r.get("backend", "cellserve") == "cellserve"]
        first = ours[0].get("asked_loop") if ours else None
        mine = [r for r in ours if r.get("asked_loop") == first]  # the first step loop: every policy ran on it
        best = {p: max((r["throughput_rps"] for r in mine if r["policy"] == p and r["sustained"]), default=0.0)
                for p in POLICIES}
        python = [r["throughput_rps"] for r in ours if r["policy"] == "cellular" and r["sustained"]
                  and r.get("step_loop") == "python" and r.get("asked_loop") != first]
        graph_ok = {r["rate_rps"]: r for r in mine if r["policy"] == "graph" and r["sustained"]}
        ratios = {r["rate_rps"]: r["p90_ms"] / graph_ok[r["rate_rps"]]["p90_ms"] for r in mine
                  if r["policy"] == "cellular" and r["rate_rps"] in graph_ok and r["p90_ms"]}
        graph_max_rate = max(graph_ok, default=0.0)
        near = [v for rate, v in ratios.items() if rate >= 0.75 * graph_max_rate]
        cellular = sorted((r for r in mine if r["policy"] == "cellular" and r["p90_ms"]), key=lambda r: r["rate_rps"])
        out.append({"workload": name, "step_loop": mine[0].get("step_loop") if mine else None,
                    **{f"max_sustained_{p}": best[p] for p in POLICIES},
                    "max_sustained_cellular_python": max(python) if python else None,
                    "native_over_python": best["cellular"] / max(python) if python else None,
                    "throughput_ratio": best["cellular"] / best["graph"] if best["graph"] else None,
                    "worst_p90_ratio": max(ratios.values()) if ratios else None,
                    "p90_ratio_near_saturation": max(near) if near else None,
                    "light_p99_over_p90": cellular[0]["p99_ms"] / cellular[0]["p90_ms"] if cellular else None,
                    "lost": sum(r["lost"] for r in mine)})
    return out


def plot(rows: list[dict], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    for name in dict.fromkeys(r["workload"] for r in rows):
        fig, ax = plt.subplots(figsize=(6, 4))
        lines = dict.fromkeys((r["policy"], r.get("step_loop")) for r in rows if r["workload"] == name)
        for policy, loop in lines:
            pts = [(r["throughput_rps"], r["p90_ms"]) for r in rows if r["workload"] == name and r["policy"] == policy
                   and r.get("step_loop") == loop and r.get("backend", "cellserve") == "cellserve" and r["p90_ms"]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{policy} ({loop} loop)")
        ax.set_yscale("log")
        ax.set_xlabel("throughput (requests/s)")
        ax.set_ylabel("p90 latency (ms)")
        ax.set_title(f"{name}: latency vs throughput")
        ax.axhline(SLO_P99_MS, color="grey", linestyle=":", linewidth=1, label="1 s (p99 objective)")
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"serving_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        console.print(f"wrote {path}")


def _mean_batch(engine: Engine) -> float | None:
    sizes = engine.stats.batch_sizes
    total = sum(sizes.values())
    return sum(size * n for (_, size), n in sizes.items()) / total if total else None


def _ms(v) -> str:
    return f"{v:.0f} ms" if v is not None else "-"


def _us(v) -> str:
    return f"{v:.0f} us" if v is not None else "-"
