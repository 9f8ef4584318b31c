"""A model's configuration: our config.json keys (ModelConfig), and what we use of a Triton config.pbtxt
(triton_config), with the check that its declared tensors are the model's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cellserve.engine import EngineConfig


class ModelConfig(BaseModel):
    """config.json of a model folder; every field has a default."""

    model_config = ConfigDict(extra="forbid")
    weights: str = "model.safetensors"
    weight_dtype: Literal["fp32", "bf16"] = Field("fp32", description="the dtype of the model's weight matrices "
                                                  "as served: bf16 halves their bytes and runs on AVX512-BF16 where "
                                                  "the CPU has it (accumulation, gates and state stay fp32)")
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
    max_pending_chunks: int = Field(64, ge=1, le=65536, description="chunks of one session a gRPC stream may have "
                                    "unanswered before the server stops reading it (memory: max_sessions x this)")
    block_steps: int = Field(1, ge=1, le=1024, description="streaming: frames per block (multi-time-step)")
    threads: int = Field(1, ge=1, le=256, description="cores each batched step's matrix products are split across")
    step_loop: Literal["native", "python"] = Field(
        "native", description="who runs the engine's steps: the native loop, where the model's family has one "
        "(language models and seq2seq over LSTM/GRU), or the Python loop (the reference)")
    text_codec: Literal["number-speller"] | None = None
    sequence_batching: bool | None = Field(None, description="imported graphs: serve sessions (default: when the "
                                           "graph streams: unidirectional core, per-step front and head)")
    decode: Literal["ctc", "lm"] | None = Field(None, description="imported graphs: add CTC greedy labels or the "
                                                "LM log-likelihood of the tokens to the graph's outputs")
    backend: Literal["cellserve", "onnxruntime", "onnxruntime-int8"] = Field(
        "cellserve", description="who runs the LSTM/GRU cells (onnxruntime-int8: ORT's dynamic int8 quantization)")
    controls: dict[str, float] = Field({}, description="imported graphs: scalar control inputs fixed to a value, "
                                       "which specializes the graph (Silero: {\"sr\": 16000})")
    input_shapes: dict[str, list[int]] = Field({}, description="imported graphs: an input's shape as the graph "
                                               "runs it, -1 on the batch axis (Silero: {\"input\": [-1, 576]})")
    context: dict[str, int] = Field({}, description="imported graphs with sessions: per input, the samples of a "
                                    "session's previous chunk the server puts before the next (Silero: 64)")
    state: dict[str, str] = Field({}, description="imported graphs: state input -> the output that continues it "
                                  "(found by dataflow when not given; config.pbtxt: sequence_batching.state)")

    @field_validator("controls", "input_shapes", "context", "state", mode="before")
    @classmethod
    def _json_text(cls, value):
        """config.pbtxt parameters are strings: a JSON object there is read as one."""
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                raise ValueError(f"expected a JSON object, got {value!r}")
        return value

    def import_options(self) -> dict:
        """What importing an ONNX graph for this config takes (interop/onnx_import.py)."""
        shapes = {name: list(shape) for name, shape in self.input_shapes.items()}
        return {"controls": self.controls, "input_shapes": shapes, "state_pairs": self.state}

    def engine_config(self) -> EngineConfig:
        """The engine's settings, passed whole."""
        return EngineConfig(policy=self.policy, max_batch=self.max_batch, max_queue=self.max_queue,
                            max_delay_ms=self.max_delay_ms, idle_timeout_s=self.idle_timeout_s, pick=self.pick,
                            threads=self.threads, max_running=self.max_running, max_sessions=self.max_sessions)

    def family_options(self) -> dict:
        """The keys a model family may take (each takes its own; see families/)."""
        return {"text_codec": self.text_codec, "decode": self.decode, "sequence_batching": self.sequence_batching,
                "backend": self.backend, "context": self.context}


def command_line_config(path: str | None = None, assignments=()) -> dict:
    """A model config from the command line: a config.json file, then KEY=VALUE assignments over it. A dotted
    key sets inside an object (controls.sr=16000); a value is JSON where it parses as JSON ([-1,576], 64,
    true), else a string (policy=graph)."""
    settings: dict = {}
    if path:
        try:
            settings = json.loads(Path(path).read_text())
        except OSError as exc:
            raise ValueError(f"--config {path}: {exc.strerror or exc}")
        except ValueError as exc:
            raise ValueError(f"--config {path}: not JSON ({exc})")
        if not isinstance(settings, dict):
            raise ValueError(f"--config {path}: expected a JSON object of config keys")
    for text in assignments:
        key, sep, raw = text.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ValueError(f"--set {text!r}: expected KEY=VALUE, such as controls.sr=16000")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        *parents, last = key.split(".")
        node = settings
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {text!r}: {part!r} is not an object")
        node[last] = value
    return settings


TRITON_TYPES = {"BOOL": "TYPE_BOOL", "UINT8": "TYPE_UINT8", "INT8": "TYPE_INT8", "INT32": "TYPE_INT32",
                "INT64": "TYPE_INT64", "FP16": "TYPE_FP16", "FP32": "TYPE_FP32", "FP64": "TYPE_FP64",
                "BYTES": "TYPE_STRING"}


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
        if pb.sequence_batching.state:  # Triton's implicit state: pairs by name, whatever order they sort in
            settings["state"] = {s.input_name: s.output_name for s in pb.sequence_batching.state}
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


def check_declared(served, declared: list[dict], path: Path) -> None:
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
