"""The `cellserve` command. Usage errors and bad input exit with code 2 and a one-line message."""

from __future__ import annotations

import argparse
import sys


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


def _words(text: str) -> list[str]:
    return [v for v in text.split(",") if v]


def _serve(args):
    import uvicorn

    from cellserve.server.app import create_app
    from cellserve.server.repository import Repository

    try:
        repository = Repository.from_directory(args.model_dir) if args.model_dir else Repository.defaults()
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc))
    base = f"http://{args.host}:{args.port}"
    if args.ray:
        return _serve_on_ray(args, base)
    app = create_app(repository, max_body_bytes=args.max_body_mb * 2**20)
    print(f"cellserve {', '.join(repository.models)} on {base}: inference {base}/v2/models/<name>/infer, "
          f"metrics {base}/metrics, API docs {base}/docs", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=15)


def _serve_on_ray(args, base: str):
    import os

    try:
        import ray
        from ray import serve

        from cellserve.server.ray_serve import build
    except ImportError:
        raise UsageError("--ray needs Ray Serve: pip install 'cellserve[ray]'")
    if args.replicas < 1:
        raise UsageError("--replicas must be >= 1")
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    print(f"cellserve on Ray Serve, {args.replicas} engine shard(s), on {base}: inference "
          f"{base}/v2/models/<name>/infer, metrics {base}/metrics, API docs {base}/docs", flush=True)
    serve.run(build(args.model_dir, args.replicas, args.max_body_mb * 2**20), name="cellserve", route_prefix="/",
              blocking=True)


def _demo(args):
    from cellserve import demo

    demo.run()


def _installed(module: str, extra: str) -> bool:
    """Whether an optional peer is installed; says so when it is not (its column is then left out)."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        print(f"note: {module} is not installed (pip install 'cellserve[{extra}]'); its column is left out",
              file=sys.stderr)
        return False
    return True


def _bench_cells(args):
    from cellserve.bench import cells

    unknown = set(args.cells) - set(cells.CELL_KINDS)
    if unknown:
        raise UsageError(f"unknown cell(s) {sorted(unknown)}; choose from {list(cells.CELL_KINDS)}")
    cells.run(args.cells, args.hidden, args.batch, args.seconds, args.json,
              with_torch=not args.no_torch and _installed("torch", "torch"),
              with_ort=not args.no_ort and _installed("onnxruntime", "onnx"))


def _bench_serving(args):
    from cellserve.bench import serving
    from cellserve.bench.workloads import WORKLOADS
    from cellserve.engine import POLICIES

    unknown = set(args.workloads) - set(WORKLOADS) or set(args.policies) - set(POLICIES)
    if unknown:
        raise UsageError(f"unknown workload/policy {sorted(unknown)}; workloads {list(WORKLOADS)}, "
                         f"policies {list(POLICIES)}")
    if args.duration <= 0 or any(r <= 0 for r in args.rates or []):
        raise UsageError("--duration and --rates must be positive")
    if set(args.backends) - {"cellserve", "onnxruntime"}:
        raise UsageError("--backends takes cellserve and/or onnxruntime")
    serving.run(args.workloads, args.policies, args.rates, args.duration, args.seed, args.max_batch,
                args.max_delay_ms, args.buckets, args.json, args.plots, args.backends)


def _bench_multistep(args):
    from cellserve.bench import multistep

    unknown = set(args.cells) - {"sru", "qrnn"}
    if unknown:
        raise UsageError(f"multi-step runs SRU and QRNN only, not {sorted(unknown)}")
    if min(args.k) < 1 or args.layers < 1 or args.hidden < 1 or min(args.threads) < 1:
        raise UsageError("--k, --layers, --hidden and --threads must be positive")
    multistep.run(args.cells, args.layers, args.hidden, args.k, args.threads, args.seconds, args.frame_ms,
                  with_torch=not args.no_torch and _installed("torch", "torch"),
                  with_ort=not args.no_ort and _installed("onnxruntime", "onnx"), json_path=args.json)


def _bench_http(args):
    from cellserve.bench import http

    if args.requests < 1 or min(args.clients) < 1:
        raise UsageError("--requests and --clients must be positive")
    http.run(args.requests, args.clients, json_path=args.json)


def _bench_ray(args):
    try:
        from cellserve.bench import ray_scale
    except ImportError:
        raise UsageError("needs Ray Serve: pip install 'cellserve[ray]'")
    if min(args.replicas) < 1 or args.requests < 1 or args.clients < 1:
        raise UsageError("--replicas, --requests and --clients must be positive")
    ray_scale.run(args.replicas, args.requests, args.clients, args.json)


def _import_torch(args):
    import torch

    from cellserve import models

    try:
        state = torch.load(args.state_dict, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise UsageError(f"cannot read {args.state_dict}: {exc}")
    try:
        rnn = models.rnn_from_torch(state, args.kind)
    except (ValueError, KeyError) as exc:
        raise UsageError(f"{args.state_dict}: {exc}")
    models.save(rnn, args.out)
    print(f"saved {rnn.config()} to {args.out}")


def _info(args):
    import json

    from cellserve import models

    try:
        model = models.load(args.model)
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc))
    print(json.dumps(model.config(), indent=2))


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cellserve", description="Low-latency RNN inference.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve models over the Open Inference Protocol (KServe v2) HTTP API")
    serve.add_argument("model_dir", nargs="?", help="model repository: one folder per model (weights + "
                       "config.json); the embedded models when omitted")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-body-mb", type=int, default=16, help="largest request body accepted")
    serve.add_argument("--ray", action="store_true", help="scale out on Ray Serve (joins RAY_ADDRESS if set)")
    serve.add_argument("--replicas", type=int, default=2, help="with --ray: engine shards; sessions stick to one")
    serve.set_defaults(func=_serve)

    demo = sub.add_parser("demo", help="serve the embedded number-speller and compare batching policies")
    demo.set_defaults(func=_demo)

    bench = sub.add_parser("bench", help="benchmarks: print a table and write JSON")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    b = bench_sub.add_parser("cells", help="microseconds per cell step: ours vs torch eager vs ONNX Runtime")
    b.add_argument("--json", help="write the rows to this file")
    b.add_argument("--cells", type=_words, default=["lstm", "gru", "sru"], help="comma list (lstm,gru,sru)")
    b.add_argument("--hidden", type=_ints, default=[256, 512, 1024], help="comma list of hidden sizes")
    b.add_argument("--batch", type=_ints, default=[1, 8, 32, 128], help="comma list of batch sizes")
    b.add_argument("--seconds", type=float, default=0.3, help="time budget per measurement")
    b.add_argument("--no-torch", action="store_true", help="skip the torch column")
    b.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime column")
    b.set_defaults(func=_bench_cells)

    sv = bench_sub.add_parser("serving", help="cellular vs graph vs no batching under open-loop Poisson load")
    sv.add_argument("--json", help="write the rows and summary to this file")
    sv.add_argument("--plots", default="results", help="folder for the latency-vs-throughput PNGs")
    sv.add_argument("--workloads", type=_words, default=["lm", "seq2seq", "treelstm"])
    sv.add_argument("--policies", type=_words, default=["cellular", "graph", "none"])
    sv.add_argument("--rates", type=_floats, help="offered rates in req/s (default: a grid from the "
                    "unbatched capacity up to saturation)")
    sv.add_argument("--duration", type=float, default=8.0, help="seconds of arrivals per rate and policy")
    sv.add_argument("--seed", type=int, default=0)
    sv.add_argument("--max-batch", type=int, default=64)
    sv.add_argument("--max-delay-ms", type=float, default=5.0, help="graph policy: batching window")
    sv.add_argument("--buckets", type=_ints, default=[], help="graph policy: length bucket bounds, e.g. 10,20,40")
    sv.add_argument("--backends", type=_words, default=["cellserve"],
                    help="who runs the cells: cellserve and/or onnxruntime (LSTM workloads)")
    sv.set_defaults(func=_bench_serving)

    ms = bench_sub.add_parser("multistep", help="single-stream SRU/QRNN run k time steps per call")
    ms.add_argument("--json", help="write the rows to this file")
    ms.add_argument("--cells", type=_words, default=["sru", "qrnn"])
    ms.add_argument("--layers", type=int, default=4)
    ms.add_argument("--hidden", type=int, default=1024)
    ms.add_argument("--k", type=_ints, default=[1, 2, 4, 8, 16, 32], help="block sizes")
    ms.add_argument("--threads", type=_ints, default=[1, 2], help="intra-op thread counts to measure")
    ms.add_argument("--seconds", type=float, default=0.5, help="time budget per measurement")
    ms.add_argument("--frame-ms", type=float, default=10.0, help="input frame period, for the added latency")
    ms.add_argument("--no-torch", action="store_true")
    ms.add_argument("--no-ort", action="store_true")
    ms.set_defaults(func=_bench_multistep)

    hb = bench_sub.add_parser("http", help="latency the HTTP server adds over calling the engine in-process")
    hb.add_argument("--json", help="write the rows to this file")
    hb.add_argument("--requests", type=int, default=400)
    hb.add_argument("--clients", type=_ints, default=[1, 16], help="concurrent clients to measure")
    hb.set_defaults(func=_bench_http)

    rb = bench_sub.add_parser("ray", help="throughput through Ray Serve with 1 vs N engine shards")
    rb.add_argument("--json", help="write the rows to this file")
    rb.add_argument("--replicas", type=_ints, default=[1, 2])
    rb.add_argument("--requests", type=int, default=600)
    rb.add_argument("--clients", type=int, default=16)
    rb.set_defaults(func=_bench_ray)

    imp = sub.add_parser("import-torch", help="convert a torch nn.LSTM/nn.GRU(/Cell) state dict to our format")
    imp.add_argument("state_dict", help="a file written by torch.save(module.state_dict())")
    imp.add_argument("out", help="output .safetensors path")
    imp.add_argument("--kind", choices=["lstm", "gru"], help="cell type (inferred when omitted)")
    imp.set_defaults(func=_import_torch)

    info = sub.add_parser("info", help="print a model file's architecture")
    info.add_argument("model")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except UsageError as exc:
        print(f"cellserve: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
