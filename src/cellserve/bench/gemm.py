"""`cellserve bench gemm`: x @ W^T on one thread, ours beside the libraries a user could pick instead, all
in this process on the same inputs, each with its weights prepacked where the library allows:

  numpy             OpenBLAS (packs W on every call)
  torch             torch.matmul (MKL sgemm)
  torch-mkl-packed  MKL's packed GEMM (cblas_sgemm_pack, through torch.ops.mkl)
  onednn            oneDNN's matmul on weights reordered once (torch.ops.mkldnn; torch bundles oneDNN 3.x)
  onnxruntime       MLAS: a MatMul node with W as an initializer (prepacked by the session)
  blis              the `blis` package, if installed

--dtype bf16 times bf16 weights (products accumulating in fp32): ours (Bf16Dense; x is fp32 and rounded per
call) beside torch's bf16 linear (oneDNN; x already bf16) and oneDNN's matmul on bf16 weights reordered once.
--dtype int8 times int8 weights (per output row) with activations quantized per call, as every dynamic
int8 product does: ours (QuantizedDense, vpdpbusd), torch's dynamic quantized Linear (FBGEMM) and ONNX
Runtime's dynamically quantized MatMul (DynamicQuantizeLinear + MatMulInteger, per-channel weights).

Implementations are timed in interleaved rounds (every round times each once), so drift on a shared
machine hits all alike; the table quotes medians. The measured peak is the best GF/s of any
implementation at any shape: the roofline the other rows are read against."""

from __future__ import annotations

import numpy as np

from cellserve.bench.common import console, interleaved_us, limit_threads, print_table, write_json

MS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SHAPES = ((256, 1024), (512, 2048), (1024, 4096))
IMPLS = ("cellserve", "numpy", "torch", "torch-mkl-packed", "onednn", "onnxruntime", "blis")
DTYPES = {"fp32": IMPLS, "bf16": ("cellserve", "torch", "onednn"),  # the implementations each dtype has
          "int8": ("cellserve", "torch", "onnxruntime")}


def _available(impl: str) -> bool:
    import importlib.util

    module = {"torch": "torch", "torch-mkl-packed": "torch", "onednn": "torch", "onnxruntime": "onnxruntime",
              "blis": "blis"}.get(impl)
    return module is None or importlib.util.find_spec(module) is not None


def _product(impl: str, w: np.ndarray, m: int, dtype: str = "fp32"):
    """A function computing x @ w.T for one fixed x of m rows, with whatever the library prepacks done now."""
    n, k = w.shape
    x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
    out = np.empty((m, n), np.float32)
    if dtype == "bf16":
        return _bf16_product(impl, w, x, out)
    if dtype == "int8":
        return _int8_product(impl, w, x, out)
    if impl == "cellserve":
        from cellserve.kernels import Dense

        dense = Dense(w)
        return lambda: dense(x, out)
    if impl == "numpy":
        wt = w.T
        return lambda: np.matmul(x, wt, out=out)
    if impl == "onnxruntime":
        from cellserve.cells.onnxruntime import ort_session
        from cellserve.interop.onnx_export import matmul_to_onnx

        session, feeds = ort_session(matmul_to_onnx(w)), {"x": x}
        return lambda: session.run(None, feeds)
    if impl == "blis":
        import blis.py

        return lambda: blis.py.gemm(x, w, trans2=True, out=out)
    import torch

    tx, tw, tout = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(out)
    if impl == "torch":
        return lambda: torch.matmul(tx, tw.T, out=tout)
    if impl == "torch-mkl-packed":
        packed = torch.ops.mkl._mkl_reorder_linear_weight(tw, m)
        return lambda: torch.ops.mkl._mkl_linear(tx, packed, tw, None, m)
    if impl == "onednn":
        packed = torch.ops.mkldnn._reorder_linear_weight(tw, m)
        return lambda: torch.ops.mkldnn._linear_pointwise(tx, packed, None, "none", [], "")
    raise ValueError(f"unknown implementation {impl!r}")


def _bf16_product(impl: str, w: np.ndarray, x: np.ndarray, out: np.ndarray):
    if impl == "cellserve":
        from cellserve.kernels import Bf16Dense

        dense = Bf16Dense(w)
        return lambda: dense(x, out)
    import torch

    tx, tw = torch.from_numpy(x).to(torch.bfloat16), torch.from_numpy(w).to(torch.bfloat16)
    if impl == "torch":
        return lambda: torch.nn.functional.linear(tx, tw)
    if impl == "onednn":
        packed = torch.ops.mkldnn._reorder_linear_weight(tw, x.shape[0])
        return lambda: torch.ops.mkldnn._linear_pointwise(tx, packed, None, "none", [], "")
    raise ValueError(f"no bf16 product for {impl!r}")


def _int8_product(impl: str, w: np.ndarray, x: np.ndarray, out: np.ndarray):
    if impl == "cellserve":
        from cellserve.kernels import QuantizedDense

        dense = QuantizedDense.from_float(w, 8)
        return lambda: dense(x, out)
    if impl == "onnxruntime":
        from cellserve.cells.onnxruntime import ort_session
        from cellserve.interop.onnx_export import matmul_to_onnx, quantize_onnx_int8

        session, feeds = ort_session(quantize_onnx_int8(matmul_to_onnx(w), ("MatMul",))), {"x": x}
        return lambda: session.run(None, feeds)
    import torch

    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data = torch.from_numpy(w)
    import warnings

    with warnings.catch_warnings():  # torch deprecates its quantized tensors in favour of torchao, not installed here
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear},
                                                           torch.qint8)
    tx = torch.from_numpy(x)
    if impl == "torch":
        return lambda: quantized(tx)
    raise ValueError(f"no int8 product for {impl!r}")


def run(ms=MS, shapes=SHAPES, impls=IMPLS, seconds: float = 0.4, json_path=None, dtypes=("fp32",)) -> dict:
    no_grad = None
    if any(i.startswith(("torch", "onednn")) for i in impls):
        import torch

        no_grad = torch.no_grad()
        no_grad.__enter__()
    result = {"dtypes": {}}
    try:
        for dtype in dtypes:
            result["dtypes"][dtype] = _run_dtype(dtype, [i for i in impls if i in DTYPES[dtype] and _available(i)],
                                                 ms, shapes, seconds)
    finally:
        if no_grad is not None:
            no_grad.__exit__(None, None, None)
    first = result["dtypes"][dtypes[0]]
    result.update(peak_gflops=first["peak_gflops"], rows=first["rows"])  # the first dtype's, as before
    write_json(json_path, result)
    return result


def _run_dtype(dtype: str, impls: list[str], ms, shapes, seconds: float) -> dict:
    rows = []
    with limit_threads(1):
        for k, n in shapes:
            w = np.random.default_rng(k).standard_normal((n, k)).astype(np.float32)
            for m in ms:
                times = interleaved_us({impl: _product(impl, w, m, dtype) for impl in impls}, seconds)
                rows += [{"impl": impl, "dtype": dtype, "m": m, "k": k, "n": n, "us": us,
                          "gflops": 2 * m * k * n / us / 1e3} for impl, us in times.items()]
    peak = max(r["gflops"] for r in rows)
    table = _summary(rows, impls, peak)
    unit = "GOP/s" if dtype == "int8" else "GF/s"
    print_table(f"x @ W^T, {dtype} weights, 1 thread: {unit} (median of interleaved rounds)", table,
                [("shape", "K x N"), ("m", "M"), ("ours_us", "ours us"), *[(i, i) for i in impls],
                 ("best_lib", "best library"), ("ratio", "ours / best"), ("of_peak", "ours % of peak")],
                caption=f"measured {dtype} peak: {peak:.1f} {unit} (best of any implementation at any shape)")
    compared = [t for t in table if "ratio" in t]
    misses = ", ".join("{shape} M={m} ({ratio:.2f})".format(**t) for t in compared if t["ratio"] < 0.95)
    console.print(f"{dtype}: ours >= 0.95x the best library at {sum(t['ratio'] >= 0.95 for t in compared)} of "
                  f"{len(compared)} shapes" + (f"; below at {misses}" if misses else ""))
    return {"peak_gflops": peak, "rows": rows}


def _summary(rows: list[dict], impls: list[str], peak: float) -> list[dict]:
    table = []
    for k, n in dict.fromkeys((r["k"], r["n"]) for r in rows):
        for m in dict.fromkeys(r["m"] for r in rows):
            here = {r["impl"]: r for r in rows if (r["k"], r["n"], r["m"]) == (k, n, m)}
            libs = {i: r for i, r in here.items() if i != "cellserve"}
            row = {"shape": f"{k}x{n}", "m": m, **{i: r["gflops"] for i, r in here.items()}}
            if "cellserve" in here:
                row["ours_us"] = here["cellserve"]["us"]
                row["of_peak"] = 100 * here["cellserve"]["gflops"] / peak
            if libs and "cellserve" in here:
                best = max(libs.values(), key=lambda r: r["gflops"])
                row["best_lib"] = best["impl"]
                row["ratio"] = here["cellserve"]["gflops"] / best["gflops"]
            table.append(row)
    return table
