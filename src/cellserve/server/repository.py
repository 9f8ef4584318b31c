"""The model repository: one folder per model with its weights and a config.json, or the embedded
default models. Each served model pairs an engine with the protocol tensors it takes and returns."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cellserve import models
from cellserve.engine import Engine, make_runner
from cellserve.models import LanguageModel, RNN, Seq2Seq, TreeLSTM
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
    pick: Literal["stage", "fullest", "oldest"] = Field("stage", description="cellular: which cell type runs next")
    max_running: int | None = Field(None, ge=1, description="cellular: requests in flight (default 2 x max_batch)")
    idle_timeout_s: float = Field(60.0, gt=0, description="streaming sessions expire after this idle time")
    block_steps: int = Field(1, ge=1, le=1024, description="streaming: frames per block (multi-time-step)")
    threads: int = Field(1, ge=1, le=256, description="cores each batched step's matrix products are split across")
    text_codec: Literal["number-speller"] | None = None
    backend: Literal["cellserve", "onnxruntime", "onnxruntime-int8"] = Field(
        "cellserve", description="who runs the LSTM/GRU cells (onnxruntime-int8: ORT's dynamic int8 quantization)")


@dataclass
class TensorSpec:
    name: str
    datatype: str
    shape: list[int]
    optional: bool = False

    def metadata(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": self.shape}


class ServedModel:
    """A model behind the protocol: turns input tensors into engine requests (one per batch row) and
    engine results back into output tensors."""

    version = "1"
    platform = "cellserve"
    stateful = False
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []

    def __init__(self, name: str, model, config: ModelConfig):
        self.name, self.model, self.config = name, model, config
        self.engine = Engine(make_runner(model, config.capacity, config.block_steps), config.policy,
                             max_batch=config.max_batch, max_queue=config.max_queue,
                             max_delay_ms=config.max_delay_ms, idle_timeout_s=config.idle_timeout_s,
                             pick=config.pick, threads=config.threads, max_running=config.max_running)

    def metadata(self) -> dict:
        return {"name": self.name, "versions": [self.version], "platform": self.platform,
                "inputs": [s.metadata() for s in self.inputs], "outputs": [s.metadata() for s in self.outputs],
                "parameters": {"architecture": self.model.config()["arch"], "policy": self.config.policy,
                               "stateful": self.stateful, "block_steps": self.config.block_steps}}

    def requests(self, tensors: dict[str, np.ndarray]) -> list[dict]:
        raise NotImplementedError

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
        self.inputs = [TensorSpec("frames", "FP32", [-1, model.input_size])]
        self.outputs = [TensorSpec("outputs", "FP32", [-1, model.hidden_size])]

    def requests(self, tensors):
        self._check_names(tensors)
        frames = tensors["frames"]
        _check_float(frames, "frames")
        if frames.ndim == 3 and frames.shape[0] == 1:
            frames = frames[0]
        return [{"frames": frames}]

    def outputs_of(self, results):
        (result,) = results
        return {"outputs": result["outputs"]}, {"frames_pending": result["frames_pending"]}


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


KINDS = {OCRModel: OCRServedModel, Seq2Seq: Seq2SeqModel, LanguageModel: LanguageModelModel, TreeLSTM: TreeModel,
         RNN: StreamModel}


def serve_model(name: str, model, config: ModelConfig) -> ServedModel:
    if config.backend.startswith("onnxruntime"):
        from cellserve.models.onnx_io import use_onnxruntime

        use_onnxruntime(model, int8=config.backend == "onnxruntime-int8")
    for cls, kind in KINDS.items():
        if isinstance(model, cls):
            return kind(name, model, config)
    raise ValueError(f"model {name!r}: architecture {model.config()['arch']!r} cannot be served")


class Repository:
    def __init__(self, served: list[ServedModel]):
        self.models = {m.name: m for m in served}

    def get(self, name: str) -> ServedModel | None:
        return self.models.get(name)

    def start(self) -> None:
        for m in self.models.values():
            m.engine.start()

    def stop(self, timeout: float = 10.0) -> None:
        for m in self.models.values():
            m.engine.stop(drain=True, timeout=timeout)

    @classmethod
    def from_directory(cls, root: str | Path) -> "Repository":
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"model repository {root} is not a directory")
        served = []
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            config_path = folder / "config.json"
            try:
                config = ModelConfig(**json.loads(config_path.read_text())) if config_path.exists() else ModelConfig()
            except (json.JSONDecodeError, ValidationError) as exc:
                raise ValueError(f"{config_path}: {exc}")
            served.append(serve_model(folder.name, models.load(folder / config.weights), config))
        if not served:
            raise ValueError(f"model repository {root} has no model folders")
        return cls(served)

    @classmethod
    def defaults(cls) -> "Repository":
        """The embedded models: the trained number speller, and an SRU frame encoder (40 filterbank-sized
        features, 2x256, fixed-seed weights) that exercises streaming sessions with 4-frame blocks."""
        from cellserve.models.speller import load_default

        speller = serve_model("speller", load_default(), ModelConfig(text_codec="number-speller"))
        stream = serve_model("sru-stream", RNN.random("sru", 40, 256, num_layers=2, seed=0),
                             ModelConfig(block_steps=4, capacity=1024))
        return cls([speller, stream])
