"""`cellserve bench multistep`: single-stream microseconds per time step when SRU/QRNN run k steps per call
(input projections of k steps as one matrix product, so the weights are read once per k steps), beside
LSTM/GRU stepping, torch eager and ONNX Runtime, the bandwidth floor, the buffering latency k adds,
and batching k independent users at k=1 for comparison."""

from __future__ import annotations

import numpy as np

from cellserve.bench.common import console, limit_threads, median_us, memory_bandwidth_gbs, print_table, write_json
from cellserve.models.rnn import RNN

KS = (1, 2, 4, 8, 16, 32)


def _ours_block(rnn: RNN, k: int, users: int = 1):
    rng = np.random.default_rng(k)
    xs = rng.standard_normal((k, users, rnn.input_size)).astype(np.float32)
    state = rnn.zero_state(users)
    return lambda: rnn.forward(xs, state)


def _torch_block(rnn: RNN, k: int):
    import torch

    from cellserve.models.torch_reference import TorchQRNN, TorchSRU

    layers = []
    for (cell,) in rnn.layers:
        if rnn.cell_kind == "sru":
            mod = TorchSRU(cell.input_size, cell.hidden_size)
        else:
            mod = TorchQRNN(cell.input_size, cell.hidden_size, cell.window)
        mod.load_state_dict({n: torch.from_numpy(np.ascontiguousarray(v)) for n, v in cell.tensors().items()})
        layers.append(mod)
    xs = torch.randn(k, 1, rnn.input_size)

    def run():
        x = xs
        for mod in layers:
            x, _ = mod(x)
        return x

    return run


def _ort_block(rnn: RNN, k: int):
    from cellserve.cells.onnxruntime import ort_session
    from cellserve.interop.onnx_export import sru_steps_to_onnx

    sessions = [ort_session(sru_steps_to_onnx(cell, k)) for (cell,) in rnn.layers]
    xs = np.random.default_rng(k).standard_normal((k, 1, rnn.input_size)).astype(np.float32)
    c0 = np.zeros((1, rnn.hidden_size), np.float32)

    def run():
        x = xs
        for s in sessions:
            x = s.run(None, {"X": x, "c0": c0})[0]
        return x

    return run


def run(cells=("sru", "qrnn"), layers: int = 4, hidden: int = 1024, ks=KS, threads=(1, 2), seconds: float = 0.5,
        frame_ms: float = 10.0, with_torch: bool = True, with_ort: bool = True, json_path=None) -> list[dict]:
    rows = []
    bandwidth = memory_bandwidth_gbs()
    for n_threads in threads:
        with limit_threads(n_threads):
            for kind in cells:
                options = {"window": 2} if kind == "qrnn" else {}
                rnn = RNN.random(kind, hidden, hidden, layers, seed=0, **options)
                floor = rnn.weight_bytes / (bandwidth * 1e3)
                base = None
                for k in ks:
                    us = median_us(_ours_block(rnn, k), seconds) / k
                    base = base or us
                    row = {"cell": kind, "layers": layers, "hidden": hidden, "k": k, "threads": n_threads,
                           "us_per_step": us, "speedup_vs_k1": base / us, "floor_us_per_step": floor / k,
                           "buffer_ms": k * frame_ms}
                    if n_threads == 1 and with_torch:
                        row["torch_us_per_step"] = median_us(_torch_block(rnn, k), seconds) / k
                    if n_threads == 1 and with_ort and kind == "sru":
                        row["ort_us_per_step"] = median_us(_ort_block(rnn, k), seconds) / k
                    rows.append(row)
                for users in (2, 4, 8, 16, 32):  # the alternative: batch k users' single steps
                    us = median_us(_ours_block(rnn, 1, users), seconds) / users
                    rows.append({"cell": kind, "layers": layers, "hidden": hidden, "k": 1, "users": users,
                                 "threads": n_threads, "us_per_step": us, "speedup_vs_k1": base / us,
                                 "buffer_ms": frame_ms})
            for kind in ("lstm", "gru"):  # cannot batch over time: step by step only
                rnn = RNN.random(kind, hidden, hidden, layers, seed=0)
                us = median_us(_ours_block(rnn, 8), seconds) / 8
                rows.append({"cell": kind, "layers": layers, "hidden": hidden, "k": 1, "threads": n_threads,
                             "us_per_step": us, "speedup_vs_k1": 1.0, "floor_us_per_step": rnn.weight_bytes
                             / (bandwidth * 1e3), "buffer_ms": frame_ms})
    print_table(f"single stream, {layers} layers x {hidden}: microseconds per time step (median)", rows,
                [("cell", "cell"), ("threads", "thr"), ("k", "k"), ("users", "users (batched, k=1)"),
                 ("us_per_step", "us/step"), ("speedup_vs_k1", "speedup"), ("torch_us_per_step", "torch us/step"),
                 ("ort_us_per_step", "ORT us/step"), ("floor_us_per_step", "DRAM floor us/step"),
                 ("buffer_ms", f"added latency ms ({frame_ms:g} ms frames)")],
                caption=f"floor = weight bytes / {bandwidth:.1f} GB/s / k. 'users' rows: us per user-step when "
                        "that many streams are batched at k=1 instead")
    write_json(json_path, {"bandwidth_gbs": bandwidth, "rows": rows})
    console.print(_advice(rows))
    return rows


def _advice(rows) -> str:
    """One line per cell: the smallest k reaching 3x, and how batching users compares at the same width."""
    lines = []
    for kind in dict.fromkeys(r["cell"] for r in rows if "users" in r):
        mine = [r for r in rows if r["cell"] == kind and r["threads"] == 1]
        by_k = {r["k"]: r for r in mine if "users" not in r}
        by_users = {r["users"]: r for r in mine if "users" in r}
        k3 = next((k for k in sorted(by_k) if by_k[k]["speedup_vs_k1"] >= 3), None)
        same = [f"k={w}: {by_k[w]['speedup_vs_k1']:.1f}x vs {w} users {by_users[w]['speedup_vs_k1']:.1f}x"
                for w in sorted(by_users) if w in by_k]
        lines.append(f"{kind}: 3x first reached at k={k3}; " + "; ".join(same))
    return "\n".join(lines)
