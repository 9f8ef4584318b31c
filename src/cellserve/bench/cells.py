"""`cellserve bench cells`: microseconds per step of one cell, ours beside torch eager and ONNX Runtime,
all on one intra-op thread in this process with the same inputs, timed in interleaved rounds; with
--threads 2 also ours on two threads (the two-core speedup); and the memory-bandwidth floor."""

from __future__ import annotations

import numpy as np

from cellserve import kernels
from cellserve.bench.common import console, interleaved_us, limit_threads, memory_bandwidth_gbs, print_table, write_json
from cellserve.cells import CELLS
from cellserve.models.rnn import RNN

CELL_KINDS = ("lstm", "gru", "sru")


def _torch_step(kind: str, cell, torch, dtype=None):
    """A torch eager step function for our cell's weights (in `dtype`, such as torch.bfloat16, if given)."""
    from cellserve.models.torch_reference import TorchSRU

    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    dtype = dtype or torch.float32
    if kind == "sru":
        ref = TorchSRU(cell.input_size, cell.hidden_size)
        ref.load_state_dict({k: t(v) for k, v in cell.tensors().items()})
        ref.to(dtype)
        return lambda x, h, c: ref(x[None], c)
    module = (torch.nn.LSTMCell if kind == "lstm" else torch.nn.GRUCell)(cell.input_size, cell.hidden_size)
    module.weight_ih.data, module.weight_hh.data = t(cell.ih.weight), t(cell.hh.weight)
    if kind == "lstm":
        module.bias_ih.data, module.bias_hh.data = t(cell.bias), torch.zeros_like(module.bias_hh)
    else:
        module.bias_ih.data, module.bias_hh.data = t(cell.b_ih), t(cell.b_hh)
    module.to(dtype)
    return (lambda x, h, c: module(x, (h, c))) if kind == "lstm" else (lambda x, h, c: module(x, h))


def _ort_step(kind: str, cell, batch: int):
    from cellserve.cells.onnxruntime import ort_session
    from cellserve.interop.onnx_export import rnn_to_onnx, sru_steps_to_onnx

    hidden = cell.hidden_size
    if kind == "sru":
        session = ort_session(sru_steps_to_onnx(cell, 1))
        feeds = {"X": np.zeros((1, batch, cell.input_size), np.float32), "c0": np.zeros((batch, hidden), np.float32)}
    else:
        session = ort_session(rnn_to_onnx(RNN([[cell]])))
        feeds = {"X": np.zeros((1, batch, cell.input_size), np.float32), "h0": np.zeros((1, batch, hidden), np.float32)}
        if kind == "lstm":
            feeds["c0"] = feeds["h0"]
    rng = np.random.default_rng(0)
    feeds = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in feeds.items()}
    return lambda: session.run(None, feeds)


def _on_threads(threads: int, fn):
    def run():
        kernels.set_threads(threads)
        fn()
    return run


def _measure(kind, hidden, batch, seconds, torch, with_ort, bandwidth, threads, bits=(32,)) -> list[dict]:
    """Rows for one cell shape: ours at every weight width (and on `threads` threads at fp32) beside torch
    and ONNX Runtime at fp32, all timed in the same interleaved rounds."""
    from cellserve.compress.quantize import quantize_matrices

    base = CELLS[kind].random(hidden, hidden, 0)
    cells = {b: base if b == 32 else quantize_matrices(base, b) for b in bits}
    rng = np.random.default_rng(batch)
    x = rng.standard_normal((batch, hidden)).astype(np.float32)
    state = tuple(rng.standard_normal((batch, w)).astype(np.float32) for w in base.state_widths())
    fns = {f"ours_{b}": _on_threads(1, lambda c=c: c.step(x, state)) for b, c in cells.items()}
    if threads > 1:
        fns["threads"] = _on_threads(threads, lambda: base.step(x, state))
    if torch is not None:
        torch_step = _torch_step(kind, base, torch)
        tx, th, tc = (torch.from_numpy(a) for a in (x, state[0], state[-1]))
        fns["torch_us"] = lambda: torch_step(tx, th, tc)
        if 16 in bits:  # bf16 rows: torch on bf16 weights and inputs (oneDNN) as their peer
            bf16_step = _torch_step(kind, base, torch, torch.bfloat16)
            bx, bh, bc = (a.to(torch.bfloat16) for a in (tx, th, tc))
            fns["torch_bf16_us"] = lambda: bf16_step(bx, bh, bc)
    if with_ort:
        fns["ort_us"] = _ort_step(kind, base, batch)
    try:
        times = interleaved_us(fns, seconds * (1 + len(bits)) / 2)
    finally:
        kernels.set_threads(1)
    rows = []
    for b, cell in cells.items():
        row = {"cell": kind, "hidden": hidden, "batch": batch, "bits": "bf16" if b == 16 else b,
               "ours_us": times[f"ours_{b}"]}
        if b == 16 and "torch_bf16_us" in times:
            row["torch_us"] = times["torch_bf16_us"]
            row["speedup_vs_torch"] = times["torch_bf16_us"] / row["ours_us"]
        if b == 32:
            for peer, key in (("torch_us", "speedup_vs_torch"), ("ort_us", "speedup_vs_ort")):
                if peer in times:
                    row[peer] = times[peer]
                    row[key] = times[peer] / row["ours_us"]
            if threads > 1:
                row[f"ours_{threads}t_us"] = times["threads"]
                row["thread_speedup"] = row["ours_us"] / times["threads"]
        if 32 in cells:
            row["speedup_vs_fp32"] = times["ours_32"] / row["ours_us"]
        row["weight_bytes"] = cell.weight_bytes
        row["floor_us"] = cell.weight_bytes / (bandwidth * 1e3)
        rows.append(row)
    return rows


def run(cells=CELL_KINDS, hiddens=(256, 512, 1024), batches=(1, 8, 32, 128), seconds: float = 0.6,
        json_path=None, with_torch: bool = True, with_ort: bool = True, threads: int = 1, bits=(32,)) -> list[dict]:
    """bits: weight widths to time (32 = fp32; 16 = bf16, torch bf16 its peer; 8/4/2/1 = our integer kernels
    with int8 activations)."""
    import contextlib

    torch, no_grad = None, contextlib.nullcontext()
    if with_torch:
        import torch

        no_grad = torch.no_grad()  # for the measurement only: not the caller's process-wide setting
    with limit_threads(1), no_grad:
        bandwidth = memory_bandwidth_gbs()
        rows = [row for kind in cells for hidden in hiddens for batch in batches
                for row in _measure(kind, hidden, batch, seconds, torch, with_ort, bandwidth, threads, bits)]
    two = [(f"ours_{threads}t_us", f"ours {threads} thr us"), ("thread_speedup", f"x {threads} thr")] if threads > 1 else []
    print_table("microseconds per step (1 thread unless noted, median of interleaved rounds)", rows,
                [("cell", "cell"), ("hidden", "hidden"), ("batch", "batch"), ("bits", "bits"),
                 ("ours_us", "ours us"), ("torch_us", "torch us"), ("ort_us", "ORT us"), ("floor_us", "DRAM floor us"),
                 ("speedup_vs_torch", "x torch"), ("speedup_vs_ort", "x ORT"),
                 *([("speedup_vs_fp32", "x our fp32")] if len(bits) > 1 else []), *two],
                caption=f"floor = weight bytes / {bandwidth:.1f} GB/s streaming-copy bandwidth; small weights "
                        f"sit in cache and can beat it")
    compared = [r for r in rows if "speedup_vs_ort" in r or "speedup_vs_torch" in r]
    behind = [r for r in compared if min(r.get("speedup_vs_ort", 9), r.get("speedup_vs_torch", 9)) < 1]
    console.print(f"ours at least as fast as every peer in {len(compared) - len(behind)} of {len(compared)} rows"
                  + ("; behind in " + ", ".join(f"{r['cell']} {r['hidden']} b{r['batch']}" for r in behind)
                     if behind else ""))
    write_json(json_path, {"bandwidth_gbs": bandwidth, "rows": rows})
    return rows
