"""Open Inference Protocol (KServe v2) tensors over HTTP: JSON data and Triton's binary tensor extension
(a JSON header of `Inference-Header-Content-Length` bytes followed by raw tensor bytes), which
tritonclient.http uses by default. Every malformed input raises ProtocolError with a message that
names the problem; the app turns it into HTTP 400."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field

import numpy as np
import orjson

DTYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
          "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
          "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_}
HEADER_LENGTH = "Inference-Header-Content-Length"


class ProtocolError(ValueError):
    """The request does not follow the protocol, or does not fit the model."""


@dataclass
class InferRequest:
    id: str | None
    parameters: dict
    inputs: dict[str, np.ndarray]
    outputs: dict[str, bool] = field(default_factory=dict)  # requested output name -> binary?
    binary_outputs: bool = False  # request-level binary_data_output


@dataclass
class InferResponse:
    """A response, whatever the wire: the requested outputs (all, when none were named), in order."""

    model_name: str
    model_version: str
    id: str | None
    outputs: dict[str, np.ndarray]
    parameters: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict)  # rows, parse_s, queue_s, compute_s: for logs and traces


_DATATYPES = {np.dtype(dtype): name for name, dtype in DTYPES.items()}


def datatype_of(array: np.ndarray) -> str:
    name = _DATATYPES.get(array.dtype) or _DATATYPES.get(array.dtype.newbyteorder("="))
    if name is None:
        raise ProtocolError(f"no protocol datatype for {array.dtype}")
    return name


def parse_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    if header_length is not None:
        try:
            split = int(header_length)
        except ValueError:
            raise ProtocolError(f"{HEADER_LENGTH} must be an integer, got {header_length!r}")
        if not 0 < split <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH} {split} is outside the body of {len(body)} bytes")
        header_bytes, binary = body[:split], memoryview(body)[split:]
    else:
        header_bytes, binary = body, memoryview(b"")
    try:
        header = orjson.loads(header_bytes)
    except orjson.JSONDecodeError:
        try:  # NaN and Infinity, which Python's json writes: the model then says what it makes of them
            header = json.loads(header_bytes)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProtocolError(f"request body is not valid JSON: {exc}")
    if not isinstance(header, dict):
        raise ProtocolError("request body must be a JSON object")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError("'inputs' must be a non-empty list of tensors")
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError("'parameters' must be an object")
    tensors, offset = {}, 0
    for spec in inputs:
        name, array, used = _parse_tensor(spec, binary, offset)
        if name in tensors:
            raise ProtocolError(f"input {name!r} given twice")
        tensors[name], offset = array, offset + used
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} bytes of binary data belong to no input")
    outputs = {}
    requested = header.get("outputs") or []
    if not isinstance(requested, list):
        raise ProtocolError("'outputs' must be a list of objects with a 'name'")
    for spec in requested:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ProtocolError("each requested output needs a 'name'")
        out_parameters = spec.get("parameters") or {}
        if not isinstance(out_parameters, dict):
            raise ProtocolError(f"output {spec['name']!r}: 'parameters' must be an object")
        outputs[spec["name"]] = bool(out_parameters.get("binary_data", False))
    req_id = header.get("id")
    return InferRequest(str(req_id) if req_id is not None else None, parameters, tensors, outputs,
                        bool(parameters.get("binary_data_output", False)))


def _parse_tensor(spec, binary: memoryview, offset: int) -> tuple[str, np.ndarray, int]:
    if not isinstance(spec, dict):
        raise ProtocolError("each input must be an object with name, shape, datatype and data")
    name, shape, datatype = spec.get("name"), spec.get("shape"), spec.get("datatype")
    if not isinstance(name, str):
        raise ProtocolError("input without a string 'name'")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise ProtocolError(f"input {name!r}: 'shape' must be a list of non-negative integers")
    if datatype not in DTYPES:
        raise ProtocolError(f"input {name!r}: unknown datatype {datatype!r}; use one of {sorted(DTYPES)}")
    count = math.prod(shape)
    params = spec.get("parameters") or {}
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise ProtocolError(f"input {name!r}: binary_data_size {size!r} runs past the binary data")
        raw = binary[offset:offset + size]
        array = from_binary(name, raw, datatype, count)
        return name, array.reshape(shape), size
    if "data" not in spec:
        raise ProtocolError(f"input {name!r} has no 'data'")
    array = _from_json(name, spec["data"], datatype)
    if array.size != count:
        raise ProtocolError(f"input {name!r}: shape {shape} needs {count} elements, data has {array.size}")
    return name, array.reshape(shape), 0


def _from_json(name: str, data, datatype: str) -> np.ndarray:
    if datatype == "BYTES":
        flat = np.array(data, dtype=object).reshape(-1)
        if not all(isinstance(v, str) for v in flat):
            raise ProtocolError(f"input {name!r}: BYTES data must be strings")
        return np.array([v.encode() for v in flat], dtype=object)
    try:
        array = np.array(data, dtype=np.float64 if datatype.startswith("FP") else None)
    except (ValueError, TypeError):
        raise ProtocolError(f"input {name!r}: data is not a (nested) list of numbers")
    if array.dtype == DTYPES[datatype]:  # JSON integers arrive as int64, booleans as bool: nothing to check
        return array.reshape(-1)
    if array.dtype == object or (array.size and not (np.issubdtype(array.dtype, np.number)
                                                     or array.dtype == np.bool_)):
        raise ProtocolError(f"input {name!r}: data is not a (nested) list of numbers")
    if datatype != "BOOL" and not datatype.startswith("FP") and array.size and not np.issubdtype(array.dtype, np.integer):
        raise ProtocolError(f"input {name!r}: {datatype} data must be integers")
    with np.errstate(over="ignore", invalid="ignore"):
        converted = array.astype(DTYPES[datatype]).reshape(-1)
    if datatype not in ("BOOL",) and not datatype.startswith("FP") and array.size and (
            (converted.astype(np.float64) != array.reshape(-1).astype(np.float64)).any()):
        raise ProtocolError(f"input {name!r}: values out of range for {datatype}")
    return converted


def from_binary(name: str, raw: memoryview, datatype: str, count: int) -> np.ndarray:
    if datatype == "BYTES":
        items, pos = [], 0
        while pos < len(raw):
            if pos + 4 > len(raw):
                raise ProtocolError(f"input {name!r}: truncated BYTES element")
            (length,) = struct.unpack_from("<I", raw, pos)
            pos += 4
            if pos + length > len(raw):
                raise ProtocolError(f"input {name!r}: truncated BYTES element")
            items.append(bytes(raw[pos:pos + length]))
            pos += length
        if len(items) != count:
            raise ProtocolError(f"input {name!r}: shape needs {count} elements, binary data has {len(items)}")
        return np.array(items, dtype=object)
    itemsize = np.dtype(DTYPES[datatype]).itemsize
    if len(raw) != count * itemsize:
        raise ProtocolError(f"input {name!r}: shape needs {count * itemsize} bytes of {datatype}, got {len(raw)}")
    return np.frombuffer(raw, dtype=np.dtype(DTYPES[datatype]).newbyteorder("<")).copy()


def build_response(response: InferResponse, req: InferRequest) -> tuple[bytes, dict[str, str]]:
    """The HTTP body: JSON, or a JSON header + binary tensors for the outputs requested as binary."""
    specs, blobs = [], []
    for name, array in response.outputs.items():
        spec = {"name": name, "shape": list(array.shape), "datatype": datatype_of(array)}
        if req.outputs.get(name) or req.binary_outputs:
            blob = to_binary(array)
            spec["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            spec["data"] = [v.decode() for v in array.reshape(-1)] if array.dtype == object else _flat(array)
        specs.append(spec)
    body = {"model_name": response.model_name, "model_version": response.model_version, "outputs": specs}
    if response.id is not None:
        body["id"] = response.id
    if response.parameters:
        body["parameters"] = response.parameters
    header = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(blobs), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def _flat(array: np.ndarray) -> np.ndarray:
    """The array as orjson writes it natively: 1-D, C-contiguous, native byte order."""
    return np.ascontiguousarray(array.reshape(-1), dtype=array.dtype.newbyteorder("="))


def to_binary(array: np.ndarray) -> bytes:
    if array.dtype == object:
        return b"".join(struct.pack("<I", len(v)) + v for v in array.reshape(-1))
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
