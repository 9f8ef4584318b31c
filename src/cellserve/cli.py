"""The `cellserve` command. Usage errors and bad input exit with code 2 and a one-line message.

About 530 lines, on purpose: the parser of every subcommand and a short handler each (argument checks, then
one call into the room that does the work), so the whole command surface reads in one place."""

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
    from cellserve.server import main
    from cellserve.server.config import command_line_config
    from cellserve.server.telemetry import configure_telemetry

    try:
        configure_telemetry(**_telemetry(args))
        settings = command_line_config(args.config, args.settings)
        if args.ray and settings:
            raise ValueError("--config and --set are not taken with --ray: give the model a folder with its "
                             "config.json")
        repository = main.repository_for(args.model_dir, args.model_control_mode, args.load_model, settings)
        if args.ray:
            return _serve_on_ray(args, f"http://{args.host}:{args.port}")
        main.serve(repository, args.host, args.port, args.grpc_port, args.max_body_mb * 2**20,
                   args.model_control_mode, args.restricted_api, args.ssl_certfile, args.ssl_keyfile,
                   args.ssl_ca_certfile, args.exit_timeout_s, args.log_level, args.frontend)
    except ValueError as exc:
        raise UsageError(str(exc))


def _telemetry(args) -> dict:
    """The log and trace settings, for this process and for Ray's replicas."""
    return {"log_level": args.log_level, "log_format": args.log_format, "trace": args.trace,
            "trace_ratio": args.trace_ratio}


def _serve_on_ray(args, base: str):
    try:
        from cellserve.server.ray_serve import run
    except ImportError:
        raise UsageError("--ray needs Ray Serve: pip install 'cellserve[ray]'")
    if args.replicas < 1:
        raise UsageError("--replicas must be >= 1")
    grpc = f"; gRPC on {args.host}:{args.grpc_port} (this process, over the same router)" if args.grpc_port else ""
    print(f"cellserve on Ray Serve, {args.replicas} engine shard(s), on {base}: inference "
          f"{base}/v2/models/<name>/infer, metrics {base}/metrics, API docs {base}/docs{grpc}", flush=True)
    run(args.model_dir, args.replicas, args.host, args.port, args.grpc_port, args.max_body_mb * 2**20,
        _telemetry(args))


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
    if args.threads < 1:
        raise UsageError("--threads must be >= 1")
    widths = {"32": 32, "bf16": 16, "8": 8, "4": 4, "2": 2, "1": 1}
    if set(args.bits) - set(widths):
        raise UsageError("--bits takes 32, bf16, 8, 4, 2 and 1")
    cells.run(args.cells, args.hidden, args.batch, args.seconds, args.json,
              with_torch=not args.no_torch and _installed("torch", "torch"),
              with_ort=not args.no_ort and _installed("onnxruntime", "onnx"), threads=args.threads,
              bits=tuple(widths[b] for b in args.bits))


def _bench_gemm(args):
    from cellserve.bench import gemm

    unknown = set(args.impls) - set(gemm.IMPLS)
    if unknown:
        raise UsageError(f"unknown implementation(s) {sorted(unknown)}; choose from {list(gemm.IMPLS)}")
    if min(args.m) < 1 or any(min(s) < 1 for s in args.shapes) or args.seconds <= 0:
        raise UsageError("--m, --shapes and --seconds must be positive")
    if not args.dtype or set(args.dtype) - set(gemm.DTYPES):
        raise UsageError(f"--dtype takes {', '.join(gemm.DTYPES)}")
    gemm.run(args.m, args.shapes, args.impls, args.seconds, args.json, tuple(args.dtype))


def _shapes(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(v) for v in s.lower().split("x", 1)) for s in text.split(",") if s]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected shapes like 256x1024,512x2048 (K x N), got {text!r}")


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
    if args.min_requests is not None and args.min_requests < 0:
        raise UsageError("--min-requests must be >= 0")
    if args.repeats < 1:
        raise UsageError("--repeats must be >= 1")
    if set(args.backends) - {"cellserve", "onnxruntime", "cellserve-bf16"}:
        raise UsageError("--backends takes cellserve, onnxruntime and cellserve-bf16 (our kernels on bf16 weights)")
    if not args.step_loops or set(args.step_loops) - {"native", "python"}:
        raise UsageError("--step-loops takes native and/or python")
    serving.run(args.workloads, args.policies, args.rates, args.duration, args.seed, args.max_batch,
                args.max_delay_ms, args.buckets, args.json, args.plots, args.backends, tune_gc=not args.python_gc,
                step_loops=args.step_loops, repeats=args.repeats,
                **({} if args.min_requests is None else {"min_requests": args.min_requests}))


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

    if args.requests < 1 or min(args.clients) < 1 or args.rounds < 1:
        raise UsageError("--requests, --clients and --rounds must be positive")
    http.run(args.requests, args.clients, json_path=args.json, triton_env=args.triton_env, rounds=args.rounds)


def _bench_streams(args):
    from cellserve.bench import streams

    if min(args.streams or [1]) < 1 or min(args.message_ms) < 32 or args.seconds <= 0 or args.idle_sessions < 0:
        raise UsageError("--streams must be positive, --message-ms at least 32 (one chunk), --seconds positive")
    if any(ms % 32 for ms in args.message_ms):
        raise UsageError("--message-ms must be whole chunks of 512 samples at 16 kHz (multiples of 32)")
    unknown = set(args.deployments) - set(streams.DEPLOYMENTS)
    if unknown:
        raise UsageError(f"unknown deployment(s) {sorted(unknown)}: {', '.join(streams.DEPLOYMENTS)}")
    try:
        streams.run(args.message_ms, args.streams or streams.STREAMS, args.deployments, args.seconds, args.idle_sessions,
                    json_path=args.json, triton_env=args.triton_env)
    except RuntimeError as exc:
        raise UsageError(str(exc))


def _bench_ray(args):
    try:
        from cellserve.bench import ray_scale
    except ImportError:
        raise UsageError("needs Ray Serve: pip install 'cellserve[ray]'")
    if min(args.replicas) < 1 or args.requests < 1 or args.clients < 1:
        raise UsageError("--replicas, --requests and --clients must be positive")
    ray_scale.run(args.replicas, args.requests, args.clients, args.json)


def _bench_compress(args):
    from cellserve.bench import compress

    try:
        qat = [tuple(int(b) for b in pair.split("/")) for pair in args.qat.split(",") if pair]
    except ValueError:
        raise UsageError(f"--qat takes weight/activation bit pairs like 8/8,4/4, not {args.qat!r}")
    if any(len(p) != 2 or p[0] not in (8, 4, 2, 1) or not 2 <= p[1] <= 8 for p in qat):
        raise UsageError("--qat pairs: weight bits 8, 4, 2 or 1 / activation bits 2..8")
    if any(not 0 < s < 1 for s in args.sparsities + args.block_sparsities):
        raise UsageError("--sparsities and --block-sparsities must lie strictly between 0 and 1")
    if min(args.train_lines, args.test_lines, args.hidden, args.student_hidden) < 2 or args.student_epochs < 1:
        raise UsageError("--train-lines, --test-lines, --hidden and --student-hidden must be >= 2, "
                         "--student-epochs >= 1")
    compress.run(args.workdir, args.train_lines, args.test_lines, args.hidden, args.train_seconds,
                 args.finetune_seconds, qat, args.sparsities, block_sparsities=args.block_sparsities,
                 student_hidden=args.student_hidden, student_epochs=args.student_epochs, json_path=args.json,
                 plot_path=args.plot)


def _ocr_train(args):
    from cellserve import models
    from cellserve.tasks import ocr_train as ot
    from cellserve.tasks.ocr_data import make_datasets

    if args.lines < 2 or args.hidden < 2 or args.seconds <= 0:
        raise UsageError("--lines and --hidden must be >= 2, --seconds positive")
    train_set, test_set = make_datasets(args.lines, max(2, args.lines // 10), args.seed)
    module = ot.train(ot.build(args.hidden, args.seed), train_set, epochs=1000, seconds=args.seconds)
    model = ot.to_runtime(module)
    models.save(model, args.out)
    print(f"saved {args.out}: held-out CER {ot.evaluate(model, test_set):.4f} on {len(test_set.texts)} lines")


def _load_ocr(path):
    from cellserve import models
    from cellserve.models.ocr import OCRModel

    try:
        model = models.load(path)
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc))
    if not isinstance(model, OCRModel):
        raise UsageError(f"{path} holds a {model.arch!r} model, not an OCR recognizer")
    return model


def _ocr_quantize(args):
    from cellserve import models
    from cellserve.compress.quantize import bf16_weights, quantize_dynamic

    model = _load_ocr(args.model)
    quantized = bf16_weights(model) if args.bits == "bf16" else quantize_dynamic(model, int(args.bits))
    models.save(quantized, args.out)
    width = "bf16" if args.bits == "bf16" else f"{args.bits}-bit"
    print(f"saved {args.out}: {width} weights, {quantized.weight_bytes} bytes (fp32: {model.weight_bytes})")


def _ocr_eval(args):
    from cellserve.bench.compress import us_per_line
    from cellserve.tasks.ocr_train import evaluate
    from cellserve.tasks.ocr_data import make_datasets

    model = _load_ocr(args.model)
    _, test_set = make_datasets(0, args.lines, args.seed)
    print(f"CER {evaluate(model, test_set):.4f} on {args.lines} held-out lines; "
          f"{us_per_line(model, test_set.images[:50]):.0f} us per line (1 thread, median)")


def _ocr_read(args):
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from cellserve.families.ocr import recognize
    from cellserve.tasks.ocr_data import HEIGHT

    model = _load_ocr(args.model)
    for path in args.images:
        try:
            image = Image.open(path).convert("L")
        except (OSError, UnidentifiedImageError) as exc:
            raise UsageError(f"cannot read image {path}: {exc}")
        if image.height != HEIGHT:
            image = image.resize((max(1, round(image.width * HEIGHT / image.height)), HEIGHT))
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        if pixels.mean() > 0.5:  # dark text on light paper: the model reads light ink on dark
            pixels = 1.0 - pixels
        try:
            print(f"{path}: {recognize(model, pixels)}")
        except ValueError as exc:
            raise UsageError(f"{path}: {exc}")


def _import_torch(args):
    import torch

    from cellserve import models
    from cellserve.interop.torch_import import load_torch, module_to_onnx, parse_arg, parse_input, rnn_from_torch, submodule

    try:
        source = load_torch(args.source)
        if isinstance(source, dict):  # a state dict: an nn.LSTM / nn.GRU's weights
            rnn = rnn_from_torch(source, args.kind)
            models.save(rnn, args.out)
            print(f"saved {rnn.config()} to {args.out}")
            return
        if not isinstance(source, torch.nn.Module):
            raise ValueError(f"{args.source} holds a {type(source).__name__}, not a module or a state dict")
        if args.submodule:
            source = submodule(source, args.submodule)
        graph = module_to_onnx(source, [parse_input(text) for text in args.input] or None,
                               dict(parse_arg(text) for text in args.arg))
    except (ValueError, KeyError) as exc:
        raise UsageError(f"{args.source}: {exc}")
    if args.onnx:
        with open(args.onnx, "wb") as f:
            f.write(graph)
    _import_graph(graph, args.out, args.source)


def _import_onnx(args):
    try:
        with open(args.model, "rb") as f:
            graph = f.read()
    except OSError as exc:
        raise UsageError(f"cannot read {args.model}: {exc}")
    _import_graph(graph, args.out, args.model)


def _import_graph(graph: bytes, out: str, source: str) -> None:
    """Split an ONNX graph around its recurrent core, save it in our format, and say what it became."""
    from cellserve import models
    from cellserve.interop.onnx_import import import_onnx

    try:
        model = import_onnx(graph)
    except ValueError as exc:
        raise UsageError(f"{source}: {exc}")
    models.save(model, out)
    rnn = model.rnn
    tensors = lambda specs: ", ".join(f"{s['name']} {s['datatype']} {s['shape']}" for s in specs)  # noqa: E731
    print(f"imported {source}: core {rnn.num_layers} x {'bi' if rnn.bidirectional else ''}{rnn.cell_kind.upper()}"
          f"({rnn.hidden_size}) over {rnn.input_size} features; inputs {tensors(model.inputs)}; outputs "
          f"{tensors(model.outputs)}; {'streams (sessions)' if model.streamable else 'whole sequences'}; "
          f"saved to {out}")


def _info(args):
    import json

    from cellserve import models
    from cellserve.bench.common import machine_line

    print(machine_line())
    if args.model is None:
        return
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
    serve.add_argument("model_dir", nargs="?", help="model repository: one folder per model (ours: weights + "
                       "config.json; Triton's: <name>/<version>/model.onnx|model.safetensors + config.pbtxt), "
                       "one model file (model.onnx or .safetensors), or a packaged model by name (silero-vad: the "
                       "silero-vad package's, configured); the embedded models when omitted")
    serve.add_argument("--config", metavar="FILE", help="a single model file's config.json (server/config.py keys)")
    serve.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                       help="a single model file's config key, over --config (repeatable; dotted keys set inside "
                       "objects: --set controls.sr=16000 --set input_shapes.input=[-1,576])")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=8001, help="gRPC (KServe v2 / Triton) port; 0 turns it off")
    serve.add_argument("--frontend", choices=["native", "python"], default=None,
                       help="HTTP and gRPC front ends: native (Boost.Beast and grpc++; the default where they were "
                       "built) or python (uvicorn and grpcio)")
    serve.add_argument("--max-body-mb", type=int, default=16, help="largest request body accepted")
    serve.add_argument("--model-control-mode", choices=["none", "explicit"], default="none",
                       help="none: the repository is fixed while serving (load/unload refused); explicit: they are "
                       "allowed, and only --load-model models load at start")
    serve.add_argument("--load-model", action="append", default=[], metavar="NAME",
                       help="explicit mode: a model folder to load at start (repeatable; '*' for every one)")
    serve.add_argument("--exit-timeout-s", type=float, default=30.0,
                       help="on SIGTERM/SIGINT: seconds accepted requests have to finish; the process then exits 0")
    serve.add_argument("--restricted-api", action="append", default=[], metavar="GROUPS:HEADER=VALUE",
                       help="restrict API groups (inference, model-repository, model-config, metadata, statistics, "
                       "health) to requests carrying HEADER=VALUE, on HTTP and gRPC alike (repeatable)")
    serve.add_argument("--ssl-certfile", help="TLS certificate (PEM) for HTTP and gRPC")
    serve.add_argument("--ssl-keyfile", help="TLS private key (PEM)")
    serve.add_argument("--ssl-ca-certfile", help="require client certificates signed by this CA (PEM)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info",
                       help="info: one access line per request, model loads and unloads; warning: problems only")
    serve.add_argument("--log-format", choices=["text", "json"], default="text", help="json: one object per line")
    serve.add_argument("--trace", metavar="otlp=URL|console|file=PATH",
                       help="OpenTelemetry spans per inference request (parse, queue, engine steps, respond), "
                       "children of the client's W3C traceparent; OTLP over HTTP, e.g. "
                       "otlp=http://localhost:4318/v1/traces (off by default)")
    serve.add_argument("--trace-ratio", type=float, default=1.0,
                       help="with --trace: the share of requests traced when the client sent no sampled "
                       "traceparent (a traced speller request costs the server ~1 ms of CPU in the OpenTelemetry SDK)")
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
    b.add_argument("--seconds", type=float, default=0.6, help="time budget per row (all implementations)")
    b.add_argument("--threads", type=int, default=1, help="also time ours on this many threads (a column)")
    b.add_argument("--bits", type=_words, default=["32"], help="weight widths to time: 32 (fp32), bf16 (torch bf16 "
                   "as the peer), 8, 4, 2, 1")
    b.add_argument("--no-torch", action="store_true", help="skip the torch column")
    b.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime column")
    b.set_defaults(func=_bench_cells)

    bg = bench_sub.add_parser("gemm", help="x @ W^T GF/s: ours vs OpenBLAS, MKL, oneDNN, ONNX Runtime, BLIS")
    bg.add_argument("--json", help="write the peak and the rows to this file")
    bg.add_argument("--m", type=_ints, default=[1, 2, 4, 8, 16, 32, 64, 128, 256], help="comma list of rows M")
    bg.add_argument("--shapes", type=_shapes, default=[(256, 1024), (512, 2048), (1024, 4096)],
                    help="comma list of K x N weight shapes")
    bg.add_argument("--impls", type=_words, default=["cellserve", "numpy", "torch", "torch-mkl-packed", "onednn",
                                                       "onnxruntime", "blis"], help="implementations to time")
    bg.add_argument("--seconds", type=float, default=0.4, help="time budget per shape (all implementations)")
    bg.add_argument("--dtype", type=_words, default=["fp32"], help="weight dtypes to time: fp32, bf16 (torch bf16 and "
                    "oneDNN as the peers), int8 (torch's dynamic quantized Linear and ONNX Runtime's MatMulInteger)")
    bg.set_defaults(func=_bench_gemm)

    sv = bench_sub.add_parser("serving", help="cellular vs graph vs no batching under open-loop Poisson load")
    sv.add_argument("--json", help="write the rows and summary to this file")
    sv.add_argument("--plots", default="results", help="folder for the latency-vs-throughput PNGs")
    sv.add_argument("--workloads", type=_words, default=["lm", "seq2seq", "treelstm", "speller"])
    sv.add_argument("--policies", type=_words, default=["cellular", "graph", "none"])
    sv.add_argument("--rates", type=_floats, help="offered rates in req/s (default: a grid from the "
                    "unbatched capacity up to saturation)")
    sv.add_argument("--duration", type=float, default=8.0, help="seconds of arrivals per rate and policy")
    sv.add_argument("--min-requests", type=int, help="a rate's trace runs longer than --duration where it would "
                    "hold fewer arrivals than this (default 200: a light rate's p90 needs them)")
    sv.add_argument("--seed", type=int, default=0)
    sv.add_argument("--repeats", type=int, default=1, help="traces per rate (seeds seed, seed+1, ...), each policy "
                    "on each in turn; rows give their medians, so one slow spell of a shared host moves one vote")
    sv.add_argument("--max-batch", type=int, default=64)
    sv.add_argument("--max-delay-ms", type=float, default=5.0, help="graph policy: batching window")
    sv.add_argument("--buckets", type=_ints, default=[], help="graph policy: length bucket bounds, e.g. 10,20,40")
    sv.add_argument("--backends", type=_words, default=["cellserve"],
                    help="who runs the cells: cellserve, onnxruntime (LSTM workloads), cellserve-bf16 (ours on bf16 weights)")
    sv.add_argument("--step-loops", type=_words, default=["native", "python"],
                    help="who runs the engine's steps: the first runs every policy, the others cellular only")
    sv.add_argument("--python-gc", action="store_true", help="leave Python's garbage collector at its defaults "
                    "(the engine freezes the loaded objects and collects less often): measures what that buys")
    sv.add_argument("--quiet", action="store_true", help="no progress bar (bars show only on a terminal)")
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
    hb.add_argument("--rounds", type=int, default=1, help="measure every phase this many times, one round after "
                    "another; CPU figures are the rounds' medians")
    hb.add_argument("--triton-env", default=".venv-triton", help="the Python environment with nvidia-pytriton that "
                    "the Silero VAD rows run Triton from (make triton-env); without it those rows leave Triton out")
    hb.set_defaults(func=_bench_http)

    st = bench_sub.add_parser("streams", help="Silero VAD for S real-time audio streams: per-stream ONNX Runtime vs "
                              "request-level batching vs cellular with server-held state")
    st.add_argument("--json", help="write the ceiling, memory per session and rows to this file")
    st.add_argument("--message-ms", type=_ints, default=[96], help="message lengths in ms (multiples of 32)")
    st.add_argument("--streams", type=_ints, default=None,
                    help="stream counts to sweep, each until a deployment stops sustaining it (default: doublings to "
                    "64, then steps of at most 1.25x to 2048)")
    st.add_argument("--deployments", type=_words,
                    default=["per-stream-ort", "graph", "cellular", "cellular-python", "cellular-ws"],
                    help="cellular: the native gRPC front end (where built); cellular-python: grpcio's; cellular-ws: "
                    "WebSockets on the HTTP port; triton: Triton Inference Server with ONNX Runtime in its Python "
                    "backend (needs make triton-env)")
    st.add_argument("--triton-env", default=".venv-triton", help="the Python environment with nvidia-pytriton, "
                    "numpy < 2 and onnxruntime that the triton deployment runs (make triton-env)")
    st.add_argument("--seconds", type=float, default=5.0, help="seconds of load per point")
    st.add_argument("--idle-sessions", type=int, default=10_000, help="idle sessions for the memory figure (0: skip)")
    st.add_argument("--quiet", action="store_true", help="no progress bar (bars show only on a terminal)")
    st.set_defaults(func=_bench_streams)

    rb = bench_sub.add_parser("ray", help="throughput through Ray Serve with 1 vs N engine shards")
    rb.add_argument("--json", help="write the rows to this file")
    rb.add_argument("--replicas", type=_ints, default=[1, 2])
    rb.add_argument("--requests", type=int, default=600)
    rb.add_argument("--clients", type=int, default=16)
    rb.set_defaults(func=_bench_ray)

    cb = bench_sub.add_parser("compress", help="OCR BiLSTM-CTC: CER vs speed of int8, QAT, pruning, distillation")
    cb.add_argument("--json", help="write the rows to this file (and a Pareto plot beside it)")
    cb.add_argument("--plot", help="Pareto plot path (default: the JSON path with .png)")
    cb.add_argument("--workdir", default="cellserve-compress", help="trained and compressed models go here")
    cb.add_argument("--train-lines", type=int, default=4000)
    cb.add_argument("--test-lines", type=int, default=400)
    cb.add_argument("--hidden", type=int, default=128, help="fp32 model (the teacher): hidden units per direction")
    cb.add_argument("--train-seconds", type=float, default=420)
    cb.add_argument("--finetune-seconds", type=float, default=90, help="per QAT / pruning fine-tune")
    cb.add_argument("--qat", default="8/8,4/8,4/4,2/8,2/4,1/8", help="weight/activation bit pairs")
    cb.add_argument("--sparsities", type=lambda s: [float(v) for v in s.split(",")], default=[0.5, 0.75, 0.9],
                    help="magnitude pruning (unstructured)")
    cb.add_argument("--block-sparsities", type=lambda s: [float(v) for v in s.split(",")], default=[0.75],
                    help="block pruning (16 x 1 blocks, run by the block-sparse kernel)")
    cb.add_argument("--student-hidden", type=int, default=48)
    cb.add_argument("--student-epochs", type=int, default=20, help="epochs for the student, with and without KD")
    cb.add_argument("--quiet", action="store_true", help="no progress bar (bars show only on a terminal)")
    cb.set_defaults(func=_bench_compress)

    ocr = sub.add_parser("ocr", help="the OCR proof task: train, quantize, evaluate and read text lines")
    ocr_sub = ocr.add_subparsers(dest="ocr_command", required=True)
    ot = ocr_sub.add_parser("train", help="train the BiLSTM-CTC recognizer on rendered docstring lines")
    ot.add_argument("out", help="output .safetensors path")
    ot.add_argument("--lines", type=int, default=4000)
    ot.add_argument("--hidden", type=int, default=128)
    ot.add_argument("--seconds", type=float, default=300, help="training time budget")
    ot.add_argument("--seed", type=int, default=0)
    ot.add_argument("--quiet", action="store_true", help="no progress bar (bars show only on a terminal)")
    ot.set_defaults(func=_ocr_train)
    oq = ocr_sub.add_parser("quantize", help="post-training int8 (or 4/2/1-bit) weights with dynamic int8 activations, or bf16 weights")
    oq.add_argument("model")
    oq.add_argument("out")
    oq.add_argument("--bits", choices=["bf16", "8", "4", "2", "1"], default="8",
                    help="bf16 weights (fp32 activations and accumulation), or int8 / 4 / 2 / 1-bit weight codes")
    oq.set_defaults(func=_ocr_quantize)
    oe = ocr_sub.add_parser("eval", help="character error rate on freshly rendered held-out lines, and speed")
    oe.add_argument("model")
    oe.add_argument("--lines", type=int, default=200)
    oe.add_argument("--seed", type=int, default=0)
    oe.set_defaults(func=_ocr_eval)
    orr = ocr_sub.add_parser("read", help="recognize the text in line images (PNG/JPEG files)")
    orr.add_argument("model")
    orr.add_argument("images", nargs="+")
    orr.set_defaults(func=_ocr_read)

    imp = sub.add_parser("import-torch", help="import a torch model: an nn.LSTM/nn.GRU state dict, or a whole "
                         "nn.Module (pickled, TorchScript or module:factory) through ONNX")
    imp.add_argument("source", help="a torch.save file (state dict or module), a TorchScript archive, or "
                     "package.module:factory")
    imp.add_argument("out", help="output .safetensors path")
    imp.add_argument("--kind", choices=["lstm", "gru"], help="state dicts: cell type (inferred when omitted)")
    imp.add_argument("--input", action="append", default=[], metavar="NAME:DTYPE:DIMS",
                     help="a module's input for the export, e.g. tokens:int64:batch,time (named dimensions vary); "
                          "repeat per input; guessed from the first layer when omitted")
    imp.add_argument("--onnx", help="also write the exported ONNX graph here")
    imp.add_argument("--arg", action="append", default=[], metavar="NAME=VALUE",
                     help="bind a non-tensor forward argument to a constant, e.g. sr=16000 (repeatable)")
    imp.add_argument("--submodule", help="import this submodule (a.b) instead, e.g. the one taking the state")
    imp.set_defaults(func=_import_torch)

    imo = sub.add_parser("import-onnx", help="import an ONNX model: its LSTM/GRU core runs as our cells, the "
                         "layers before and after it on ONNX Runtime")
    imo.add_argument("model", help="model.onnx")
    imo.add_argument("out", help="output .safetensors path")
    imo.set_defaults(func=_import_onnx)

    info = sub.add_parser("info", help="print the CPU and the kernel path that runs, and a model file's architecture")
    info.add_argument("model", nargs="?")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "quiet", False):
        from cellserve import progress

        progress.QUIET = True
    try:
        if args.command == "bench":  # every figure names what it was measured on
            from cellserve.bench.common import console, machine_line

            console.print(machine_line())
        args.func(args)
    except UsageError as exc:
        print(f"cellserve: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
