"""The model repository: one folder per model with its weights and a config.json, or the embedded
default models. Each served model pairs an engine with the protocol tensors it takes and returns."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cellserve import models
from cellserve.engine import Engine, make_runner
from cellserve.models import Classifier, LanguageModel, RNN, Seq2Seq, TreeLSTM
from cellserve.models.ocr import OCRModel
from cellserve.server.protocol import ProtocolError


class ModelConfig(BaseModel):
    """config.json of a model folder; every field has a default."""

    model_config = ConfigDict(extra="forbid")
    weights: str = "model.safetensors"
    policy: Literal["cellular", "graph", "none"] = "cellular"
    max_batch: int = Field(64, ge=1, le=4096)
    max_queue: int = Field(1024, ge=1)
    capacity: int = Field(4096, ge=1, description="state pool slots (tree nodes for a TreeLSTM)")
    max_delay_ms: float = Field(5.0, ge=0, description="graph policy batching window")
    pick: Literal["stage", "fullest", "oldest"] | None = Field(None, description="cellular: which cell type runs "
                                                               "next (default: stage; oldest for trees)")
    max_running: int | None = Field(None, ge=1, description="cellular: requests in flight (default 2 x max_batch)")
    max_sessions: int | None = Field(None, ge=1, description="open streaming sessions at once (default: capacity); "
                                     "past it a new sequence gets 503")
    idle_timeout_s: float = Field(60.0, gt=0, description="streaming sessions expire after this idle time")
    block_steps: int = Field(1, ge=1, le=1024, description="streaming: frames per block (multi-time-step)")
    threads: int = Field(1, ge=1, le=256, description="cores each batched step's matrix products are split across")
    text_codec: Literal["number-speller"] | None = None
    sequence_batching: bool | None = Field(None, description="imported graphs: serve sessions (default: when the "
                                           "graph streams: unidirectional core, per-step front and head)")
    decode: Literal["ctc", "lm"] | None = Field(None, description="imported graphs: add CTC greedy labels or the "
                                                "LM log-likelihood of the tokens to the graph's outputs")
    backend: Literal["cellserve", "onnxruntime", "onnxruntime-int8"] = Field(
        "cellserve", description="who runs the LSTM/GRU cells (onnxruntime-int8: ORT's dynamic int8 quantization)")


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, n: int = 1) -> None:
        self.count += n
        self.ns += int(seconds * 1e9)


@dataclass
class InferenceStats:
    """Per-model request statistics in Triton's shape (GET /v2/models/<m>/stats, gRPC ModelStatistics):
    success/fail count requests with their total time; queue, compute_input (parsing), compute_infer
    (the engine) and compute_output (building the reply) split the successful ones' time."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0  # batch rows (engine requests) of successful requests
    last_inference: int = 0  # ms since the epoch
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, ok: bool, total: float, parse: float = 0.0, queue: float = 0.0, infer: float = 0.0,
               output: float = 0.0, rows: int = 0) -> None:
        with self.lock:
            if not ok:
                self.fail.add(total)
                return
            self.success.add(total)
            self.compute_input.add(parse)
            self.queue.add(queue)
            self.compute_infer.add(infer)
            self.compute_output.add(output)
            self.inference_count += rows
            self.last_inference = int(time.time() * 1000)

    def triton(self, name: str, version: str, execution_count: int) -> dict:
        names = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
        with self.lock:
            stats = {k: {"count": getattr(self, k).count, "ns": getattr(self, k).ns} for k in names}
            return {"name": name, "version": version, "last_inference": self.last_inference,
                    "inference_count": self.inference_count, "execution_count": execution_count,
                    "inference_stats": {**stats, "cache_hit": {"count": 0, "ns": 0},
                                        "cache_miss": {"count": 0, "ns": 0}},
                    "batch_stats": []}


TRITON_TYPES = {"BOOL": "TYPE_BOOL", "UINT8": "TYPE_UINT8", "INT8": "TYPE_INT8", "INT32": "TYPE_INT32",
                "INT64": "TYPE_INT64", "FP16": "TYPE_FP16", "FP32": "TYPE_FP32", "FP64": "TYPE_FP64",
                "BYTES": "TYPE_STRING"}


@dataclass
class TensorSpec:
    name: str
    datatype: str
    shape: list[int]
    optional: bool = False

    def metadata(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": self.shape}


SNAPSHOT = TensorSpec("sequence_snapshot", "BYTES", [1], optional=True)  # a stateful model's session state


class ServedModel:
    """A model behind the protocol: turns input tensors into engine requests (one per batch row) and
    engine results back into output tensors."""

    version = "1"
    versions: list[str] | None = None  # every version in the repository (default: the served one)
    platform = "cellserve"
    stateful = False
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []

    def __init__(self, name: str, model, config: ModelConfig):
        from cellserve.server.snapshot import architecture_hash

        self.name, self.model, self.config = name, model, config
        self.architecture = architecture_hash(model)
        self.stats = InferenceStats()
        self.engine = Engine(self.runner(model, config), config.policy,
                             max_batch=config.max_batch, max_queue=config.max_queue,
                             max_delay_ms=config.max_delay_ms, idle_timeout_s=config.idle_timeout_s,
                             pick=config.pick, threads=config.threads, max_running=config.max_running,
                             max_sessions=config.max_sessions)

    @staticmethod
    def runner(model, config: ModelConfig):
        return make_runner(model, config.capacity, config.block_steps)

    def metadata(self) -> dict:
        return {"name": self.name, "versions": self.versions or [self.version], "platform": self.platform,
                "inputs": [s.metadata() for s in self.inputs], "outputs": [s.metadata() for s in self.outputs],
                "parameters": {"architecture": self.model.config()["arch"], "policy": self.config.policy,
                               "stateful": self.stateful, "block_steps": self.config.block_steps}}

    def model_config(self) -> dict:
        """The model's configuration in Triton's JSON shape (GET /v2/models/<m>/config)."""
        def tensors(specs):
            return [{"name": s.name, "data_type": TRITON_TYPES.get(s.datatype, "TYPE_INVALID"), "dims": s.shape,
                     **({"optional": True} if s.optional else {})} for s in specs]

        config = {"name": self.name, "platform": self.platform, "backend": self.config.backend,
                  "max_batch_size": self.config.max_batch, "input": tensors(self.inputs),
                  "output": tensors(self.outputs),
                  "parameters": {"architecture": {"string_value": self.model.config()["arch"]},
                                 "policy": {"string_value": self.config.policy}}}
        if self.stateful:
            config["sequence_batching"] = {"max_sequence_idle_microseconds": int(self.config.idle_timeout_s * 1e6)}
        else:
            config["dynamic_batching"] = {"max_queue_delay_microseconds": int(self.config.max_delay_ms * 1000)}
        return config

    def requests(self, tensors: dict[str, np.ndarray]) -> list[dict]:
        raise NotImplementedError

    def restore_of(self, tensors) -> dict:
        """The session state in the request's sequence_snapshot tensor (sequence_restore)."""
        from cellserve.server.snapshot import from_text

        blob = tensors.get("sequence_snapshot")
        if blob is None or blob.size != 1 or blob.dtype != object:
            raise ProtocolError("sequence_restore needs the snapshot as input 'sequence_snapshot' (BYTES, shape [1])")
        return from_text(blob.reshape(-1)[0], self.name, self.architecture)

    def snapshot_of(self, result: dict) -> np.ndarray:
        """A session's state (a runner's result["snapshot"]) as the sequence_snapshot output tensor."""
        from cellserve.server.snapshot import to_text

        return np.array([to_text(self.name, self.architecture, result["snapshot"])], dtype=object)

    def outputs_of(self, results: list) -> tuple[dict[str, np.ndarray], dict]:
        raise NotImplementedError

    def _check_names(self, tensors: dict) -> None:
        known = {s.name for s in self.inputs}
        unknown = set(tensors) - known
        if unknown:
            raise ProtocolError(f"unknown input(s) {sorted(unknown)} for model {self.name!r}; it takes {sorted(known)}")
        missing = [s.name for s in self.inputs if not s.optional and s.name not in tensors]
        if missing:
            raise ProtocolError(f"model {self.name!r} needs input(s) {missing}")


def _check_float(array: np.ndarray, name: str) -> None:
    if array.dtype not in (np.float32, np.float64, np.float16):
        raise ProtocolError(f"input {name!r} must be FP32, got {array.dtype}")


def _rows(array: np.ndarray, name: str, integer: bool = True) -> np.ndarray:
    """A [batch, length] view of a token tensor given as [length] or [batch, length]."""
    if integer and not np.issubdtype(array.dtype, np.integer):
        raise ProtocolError(f"input {name!r} must be an integer tensor (INT32/INT64), got {array.dtype}")
    if array.ndim == 1:
        return array[None]
    if array.ndim != 2:
        raise ProtocolError(f"input {name!r} must have shape [length] or [batch, length], got {list(array.shape)}")
    return array


class Seq2SeqModel(ServedModel):
    def __init__(self, name, model: Seq2Seq, config):
        super().__init__(name, model, config)
        self.codec = config.text_codec
        self.inputs = [TensorSpec("tokens", "INT64", [-1, -1], optional=bool(self.codec)),
                       TensorSpec("max_output_tokens", "INT64", [-1], optional=True)]
        self.outputs = [TensorSpec("tokens", "INT64", [-1, -1]), TensorSpec("lengths", "INT64", [-1])]
        if self.codec:
            self.inputs.append(TensorSpec("text", "BYTES", [-1], optional=True))
            self.outputs.append(TensorSpec("text", "BYTES", [-1]))

    def requests(self, tensors):
        self._check_names(tensors)
        if ("text" in tensors) == ("tokens" in tensors):
            raise ProtocolError("give exactly one of 'tokens' or 'text'" if self.codec else "'tokens' is required")
        if "text" in tensors:
            from cellserve.models.speller import encode_number

            try:
                rows = [encode_number(v.decode().strip()) for v in tensors["text"].reshape(-1)]
            except (UnicodeDecodeError, ValueError) as exc:
                raise ProtocolError(f"input 'text': {exc}")
        else:
            rows = [list(r) for r in _rows(tensors["tokens"], "tokens")]
        limits = tensors.get("max_output_tokens")
        if limits is not None:
            limits = limits.reshape(-1)
            if len(limits) not in (1, len(rows)) or not np.issubdtype(limits.dtype, np.integer):
                raise ProtocolError("max_output_tokens must be one integer or one per batch row")
        out = []
        for i, row in enumerate(rows):
            req = {"tokens": np.asarray(row, dtype=np.int64)}
            if limits is not None:
                req["max_output_tokens"] = int(limits[i if len(limits) > 1 else 0])
            elif self.codec:
                req["max_output_tokens"] = 16
            out.append(req)
        return out

    def outputs_of(self, results):
        seqs = [r["tokens"] for r in results]
        width = max(map(len, seqs))
        tokens = np.full((len(seqs), width), self.model.eos_id, dtype=np.int64)
        for i, s in enumerate(seqs):
            tokens[i, :len(s)] = s
        outputs = {"tokens": tokens, "lengths": np.array([len(s) for s in seqs], dtype=np.int64)}
        if self.codec:
            from cellserve.models.speller import decode_words

            outputs["text"] = np.array([decode_words(s).encode() for s in seqs], dtype=object)
        return outputs, {}


class LanguageModelModel(ServedModel):
    inputs = [TensorSpec("tokens", "INT64", [-1, -1])]
    outputs = [TensorSpec("log_likelihood", "FP64", [-1]), TensorSpec("next_token", "INT64", [-1])]

    def requests(self, tensors):
        self._check_names(tensors)
        return [{"tokens": row} for row in _rows(tensors["tokens"], "tokens")]

    def outputs_of(self, results):
        return {"log_likelihood": np.array([r["log_likelihood"] for r in results], dtype=np.float64),
                "next_token": np.array([r["next_token"] for r in results], dtype=np.int64)}, {}


class TreeModel(ServedModel):
    inputs = [TensorSpec("tokens", "INT64", [-1]), TensorSpec("parents", "INT64", [-1])]
    outputs = [TensorSpec("logits", "FP32", [1, -1])]

    def requests(self, tensors):
        self._check_names(tensors)
        tokens, parents = (_rows(tensors[n], n) for n in ("tokens", "parents"))
        if tokens.shape[0] != 1 or parents.shape[0] != 1:
            raise ProtocolError("one tree per request: tokens and parents of shape [nodes]")
        return [{"tokens": tokens[0], "parents": parents[0]}]

    def outputs_of(self, results):
        return {"logits": np.array([r["logits"] for r in results], dtype=np.float32)}, {}


class StreamModel(ServedModel):
    """Frames in, per-frame outputs back; with sequence parameters, state persists between chunks."""

    stateful = True

    def __init__(self, name, model: RNN, config):
        super().__init__(name, model, config)
        self.inputs = [TensorSpec("frames", "FP32", [-1, model.input_size], optional=True), SNAPSHOT]
        self.outputs = [TensorSpec("outputs", "FP32", [-1, model.hidden_size]), SNAPSHOT]

    def requests(self, tensors):
        self._check_names(tensors)
        frames = tensors.get("frames")
        if frames is None:
            if "sequence_snapshot" not in tensors:
                raise ProtocolError(f"model {self.name!r} needs input 'frames'")
            frames = np.zeros((0, self.model.input_size), np.float32)
        _check_float(frames, "frames")
        if frames.ndim == 3 and frames.shape[0] == 1:
            frames = frames[0]
        return [{"frames": frames}]

    def outputs_of(self, results):
        (result,) = results
        outputs = {"outputs": result["outputs"]}
        if "snapshot" in result:
            outputs["sequence_snapshot"] = self.snapshot_of(result)
        return outputs, {"frames_pending": result["frames_pending"]}


class OCRServedModel(ServedModel):
    """Line images in ([height, width] or [batch, height, width], ink bright on dark), text out."""

    def __init__(self, name, model: OCRModel, config):
        super().__init__(name, model, config)
        self.inputs = [TensorSpec("image", "FP32", [-1, model.rnn.input_size // model.stride, -1])]
        self.outputs = [TensorSpec("text", "BYTES", [-1])]

    def requests(self, tensors):
        self._check_names(tensors)
        images = tensors["image"]
        _check_float(images, "image")
        if images.ndim == 2:
            images = images[None]
        if images.ndim != 3:
            raise ProtocolError(f"input 'image' must have shape [height, width] or [batch, height, width], "
                                f"got {list(images.shape)}")
        return [{"image": image} for image in images]

    def outputs_of(self, results):
        return {"text": np.array([r["text"].encode() for r in results], dtype=object)}, {}


class ClassifierModel(ServedModel):
    """Token sequences in, class logits out (the final hidden state(s) through the head)."""

    def __init__(self, name, model: Classifier, config):
        super().__init__(name, model, config)
        self.inputs = [TensorSpec("tokens", "INT64", [-1, -1])]
        self.outputs = [TensorSpec("logits", "FP32", [-1, model.num_classes])]

    def requests(self, tensors):
        self._check_names(tensors)
        return [{"tokens": row} for row in _rows(tensors["tokens"], "tokens")]

    def outputs_of(self, results):
        return {"logits": np.stack([r["logits"] for r in results]).astype(np.float32)}, {}


class ImportedServedModel(ServedModel):
    """An imported ONNX graph behind its own tensors: the names, datatypes and shapes of the original,
    so a client written for Triton + ONNX Runtime works unchanged. A request's rows (along each tensor's
    batch axis) run as separate engine requests; a streaming graph also serves sessions."""

    def __init__(self, name, model, config):
        model.set_decode(config.decode)
        if config.sequence_batching and not model.streamable:
            raise ValueError("sequence batching needs a graph that streams (unidirectional core, and a front and "
                             "head that work step by step, so chunks give what one pass gives); this one does not")
        super().__init__(name, model, config)
        self.stateful = config.backend == "cellserve" and (
            model.streamable if config.sequence_batching is None else config.sequence_batching)
        self.inputs = [TensorSpec(i["name"], i["datatype"], i["shape"]) for i in model.inputs]
        self.outputs = [TensorSpec(o["name"], o["datatype"], o["shape"]) for o in model.outputs]
        if config.decode:
            extra = model.EXTRA_OUTPUTS[config.decode]
            self.outputs.append(TensorSpec(extra["name"], extra["datatype"], extra["shape"]))
        if self.stateful:
            self.inputs.append(SNAPSHOT)
            self.outputs.append(SNAPSHOT)

    @staticmethod
    def runner(model, config):
        if config.backend == "onnxruntime":  # the original graph on ONNX Runtime, as Triton would run it
            from cellserve.engine.runners import WholeGraphRunner

            return WholeGraphRunner(model, config.capacity)
        if config.backend != "cellserve":
            raise ValueError(f"backend {config.backend!r} does not run imported graphs (cellserve or onnxruntime)")
        return make_runner(model, config.capacity, config.block_steps)

    def requests(self, tensors):
        tensors = {k: v for k, v in tensors.items() if k != "sequence_snapshot"}
        try:
            return self.model.rows(tensors)
        except ValueError as exc:
            raise ProtocolError(str(exc))

    def outputs_of(self, results):
        outputs = self.model.join(results)
        if len(results) == 1 and "snapshot" in results[0]:
            outputs["sequence_snapshot"] = self.snapshot_of(results[0])
        if len(results) == 1 and "frames_pending" in results[0]:  # a session's frames short of a block
            return outputs, {"frames_pending": results[0]["frames_pending"]}
        return outputs, {}


KINDS = {OCRModel: OCRServedModel, Seq2Seq: Seq2SeqModel, LanguageModel: LanguageModelModel, TreeLSTM: TreeModel,
         RNN: StreamModel, Classifier: ClassifierModel}


def serve_model(name: str, model, config: ModelConfig) -> ServedModel:
    if model.arch == "onnx":
        return ImportedServedModel(name, model, config)
    if config.backend.startswith("onnxruntime"):
        from cellserve.models.onnx_io import use_onnxruntime

        use_onnxruntime(model, int8=config.backend == "onnxruntime-int8")
    for cls, kind in KINDS.items():
        if isinstance(model, cls):
            return kind(name, model, config)
    raise ValueError(f"model {name!r}: architecture {model.config()['arch']!r} cannot be served")


class Repository:
    """The served models, by name. With a root folder, models can be (re)loaded and unloaded while serving:
    a load builds the new version beside the old one and swaps it in, and the old engine finishes what it
    was given (drains) in the background."""

    def __init__(self, served: list[ServedModel], root: Path | None = None, factories: dict | None = None):
        self.models = {m.name: m for m in served}
        self.root = root
        self.factories = factories or {}  # name -> () -> ServedModel, for models without a folder
        self.unavailable: dict[str, str] = {}  # name -> reason (failed to load, unloaded)
        self.lock = threading.Lock()
        self.started = False

    def get(self, name: str) -> ServedModel | None:
        return self.models.get(name)

    def start(self) -> None:
        self.started = True
        for m in self.models.values():
            m.engine.start()

    def stop(self, timeout: float = 10.0) -> None:
        for m in self.models.values():
            m.engine.stop(drain=True, timeout=timeout)

    def known(self) -> list[str]:
        """Every model this repository can serve: loaded ones, folders on disk, embedded ones."""
        names = set(self.models) | set(self.factories) | set(self.unavailable)
        if self.root is not None and self.root.is_dir():
            names |= {p.name for p in self.root.iterdir() if p.is_dir()}
        return sorted(names)

    def index(self, ready_only: bool = False) -> list[dict]:
        rows = []
        for name in self.known():
            served = self.models.get(name)
            row = {"name": name, "version": served.version if served else "",
                   "state": "READY" if served else "UNAVAILABLE",
                   "reason": "" if served else self.unavailable.get(name, "not loaded")}
            if served or not ready_only:
                rows.append(row)
        return rows

    def build(self, name: str) -> ServedModel:
        if name in self.factories:
            return self.factories[name]()
        folder = self.root / name if self.root is not None else None
        if folder is None or not folder.is_dir():
            raise KeyError(f"no model {name!r} in this repository; it has {self.known()}")
        return load_folder(folder)

    def load(self, name: str) -> tuple[ServedModel, ServedModel | None]:
        """(Re)load a model and serve it; returns (new, old). The old one, if any, must be retired by the
        caller (retire) once nobody can reach it. Raises KeyError (unknown) or ValueError (bad files)."""
        try:
            served = self.build(name)
        except ValueError as exc:
            with self.lock:
                self.unavailable[name] = str(exc)
            raise
        if self.started:
            served.engine.start()
        with self.lock:
            old = self.models.get(name)
            self.models[name] = served
            self.unavailable.pop(name, None)
        return served, old

    def unload(self, name: str) -> ServedModel:
        with self.lock:
            served = self.models.pop(name, None)
            if served is None:
                raise KeyError(f"model {name!r} is not loaded")
            self.unavailable[name] = "unloaded"
        return served

    @staticmethod
    def retire(served: ServedModel, timeout: float = 60.0) -> None:
        """Stop a replaced or unloaded model's engine once its queued and running requests are done."""
        threading.Thread(target=served.engine.stop, kwargs={"drain": True, "timeout": timeout},
                         name=f"retire-{served.name}", daemon=True).start()

    @classmethod
    def from_path(cls, path: str | Path) -> "Repository":
        """A repository folder, or a single model file (model.onnx or ours) served under its stem."""
        path = Path(path)
        if path.is_file():
            return cls([serve_model(path.stem, _load_model(path), ModelConfig())])
        return cls.from_directory(path)

    @classmethod
    def from_directory(cls, root: str | Path) -> "Repository":
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"model repository {root} is not a directory")
        served = [load_folder(folder) for folder in sorted(p for p in root.iterdir() if p.is_dir())]
        if not served:
            raise ValueError(f"model repository {root} has no model folders")
        return cls(served, root)

    @classmethod
    def defaults(cls) -> "Repository":
        """The embedded models: the trained number speller, and an SRU frame encoder (40 filterbank-sized
        features, 2x256, fixed-seed weights) that exercises streaming sessions with 4-frame blocks."""
        from cellserve.models.speller import load_default

        factories = {
            "speller": lambda: serve_model("speller", load_default(), ModelConfig(text_codec="number-speller")),
            "sru-stream": lambda: serve_model("sru-stream", RNN.random("sru", 40, 256, num_layers=2, seed=0),
                                              ModelConfig(block_steps=4, capacity=1024))}
        return cls([make() for make in factories.values()], factories=factories)


def load_folder(folder: Path) -> ServedModel:
    """A model folder, ValueError naming what is wrong. Two layouts:
      ours    weights (model.safetensors) + optional config.json;
      Triton  numbered version folders holding model.onnx or model.safetensors, and an optional
              config.pbtxt (and/or config.json) beside them; the newest version is served unless the
              config's version_policy names others (the newest of those)."""
    versions = sorted((p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    settings, declared = {}, None
    if (folder / "config.pbtxt").exists():
        settings, declared = triton_config(folder / "config.pbtxt", folder.name)
    config_path = folder / "config.json"
    try:
        if config_path.exists():
            settings.update(json.loads(config_path.read_text()))
        policy = settings.pop("version_policy", None)
        filename = settings.pop("default_model_filename", None)
        config = ModelConfig(**settings)
    except (json.JSONDecodeError, ValidationError) as exc:
        raise ValueError(f"{config_path if config_path.exists() else folder / 'config.pbtxt'}: {exc}")
    if not versions:
        served = serve_model(folder.name, _load_model(folder / (filename or config.weights)), config)
    else:
        chosen = _pick_version(versions, policy)
        files = [filename] if filename else ["model.onnx", "model.safetensors"]
        path = next((chosen / f for f in files if (chosen / f).exists()), None)
        if path is None:
            raise ValueError(f"version folder {chosen} holds none of {files}")
        served = serve_model(folder.name, _load_model(path), config)
        served.version, served.versions = chosen.name, [v.name for v in versions]
    if declared is not None:
        _check_declared(served, declared, folder / "config.pbtxt")
    return served


def _load_model(path: Path):
    """Our model file, or an ONNX graph imported on the spot."""
    if path.suffix == ".onnx":
        from cellserve.models.imported import import_onnx

        if not path.exists():
            raise ValueError(f"{path} does not exist")
        return import_onnx(path)
    try:
        return models.load(path)
    except OSError as exc:
        raise ValueError(f"{path}: {exc}")


def _pick_version(versions: list[Path], policy: dict | None) -> Path:
    if policy and policy.get("specific"):
        wanted = {str(v) for v in policy["specific"]}
        chosen = [v for v in versions if v.name in wanted]
        if not chosen:
            raise ValueError(f"version_policy names versions {sorted(wanted)}; the folder has {[v.name for v in versions]}")
        return chosen[-1]
    return versions[-1]


def triton_config(path: Path, folder_name: str) -> tuple[dict, list[dict]]:
    """What we use of a Triton config.pbtxt: (our config settings, declared input/output tensors).
    max_batch_size -> max_batch; sequence_batching (max_sequence_idle_microseconds) -> sessions and
    their idle timeout; dynamic_batching's max_queue_delay_microseconds -> the graph policy's window;
    parameters {key: string_value} -> our config keys (policy, block_steps, threads, decode, ...);
    version_policy and default_model_filename; input/output names, datatypes and dims are checked
    against the model's."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        pb = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise ValueError(f"{path}: {exc}")
    if pb.name and pb.name != folder_name:
        raise ValueError(f"{path} names the model {pb.name!r}, but its folder is {folder_name!r}")
    settings: dict = {k: v.string_value for k, v in pb.parameters.items()}
    if pb.max_batch_size > 0:
        settings["max_batch"] = pb.max_batch_size
    if pb.HasField("sequence_batching"):
        settings["sequence_batching"] = True
        if pb.sequence_batching.max_sequence_idle_microseconds:
            settings["idle_timeout_s"] = pb.sequence_batching.max_sequence_idle_microseconds / 1e6
    if pb.HasField("dynamic_batching") and pb.dynamic_batching.max_queue_delay_microseconds:
        settings["max_delay_ms"] = pb.dynamic_batching.max_queue_delay_microseconds / 1000
    if pb.default_model_filename:
        settings["default_model_filename"] = pb.default_model_filename
    if pb.HasField("version_policy") and pb.version_policy.WhichOneof("policy_choice") == "specific":
        settings["version_policy"] = {"specific": list(pb.version_policy.specific.versions)}
    batch = [-1] if pb.max_batch_size > 0 else []
    declared = [{"io": io, "name": t.name, "datatype": model_config_pb2.DataType.Name(t.data_type),
                 "dims": batch + list(t.dims)} for io, tensors in (("input", pb.input), ("output", pb.output))
                for t in tensors]
    return settings, declared


def _check_declared(served: ServedModel, declared: list[dict], path: Path) -> None:
    """config.pbtxt's tensors must be the model's: same names, datatypes, and dims (-1 matches any)."""
    for d in declared:
        specs = {s.name: s for s in (served.inputs if d["io"] == "input" else served.outputs)}
        spec = specs.get(d["name"])
        if spec is None:
            raise ValueError(f"{path} declares {d['io']} {d['name']!r}; the model's {d['io']}s are {sorted(specs)}")
        if d["datatype"] != "TYPE_INVALID" and TRITON_TYPES.get(spec.datatype) != d["datatype"]:
            raise ValueError(f"{path}: {d['io']} {d['name']!r} is {TRITON_TYPES.get(spec.datatype)} in the model, "
                             f"{d['datatype']} in the config")
        if len(d["dims"]) != len(spec.shape) or any(a != b and -1 not in (a, b) for a, b in zip(d["dims"], spec.shape)):
            raise ValueError(f"{path}: {d['io']} {d['name']!r} has dims {spec.shape} in the model (with the batch "
                             f"dimension), {d['dims']} in the config")
