"""A model imported from an ONNX graph, at run time: the graph's front and head (serialized ONNX, run by
ONNX Runtime) around our recurrent core. The graph surgery that makes one (split, probing, checks) is
interop/onnx_import.py.

  front  graph inputs -> the first recurrent operator's input X [T, B, F];
  core   the LSTM/GRU operators, as our cells;
  head   what the graph computes from the core's outputs and its own inputs.
Sequence lengths (the operators' sequence_lens) come from a third cut-out graph; the core runs each row
over its own steps only, and its outputs are padded back with zeros as the ONNX operators pad them.
Each graph input and output keeps its name, datatype and shape; `spec` holds them with their batch and
time axes."""

from __future__ import annotations

import json

import numpy as np
import onnx

from cellserve.cells.onnxruntime import ort_session
from cellserve.models.rnn import RNN, prefixed, unprefixed

NUMPY = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32,
         "INT16": np.int16, "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_}


class ImportedModel:
    """An imported graph: front and head (serialized ONNX, run by ONNX Runtime) around `rnn`, our cells.
    `spec` describes the graph's tensors and how the core's outputs feed the head (see import_onnx)."""

    arch = "onnx"
    PADDED_STEPS = "cellserve.padded_steps"  # kept in a row's inputs by frames_of when lengths cut it

    def __init__(self, front: bytes, head: bytes, rnn: RNN, spec: dict, whole: bytes = b"", lengths: bytes = b""):
        self.front_graph, self.head_graph, self.rnn, self.spec = front, head, rnn, spec
        self.lengths_graph = lengths  # graph inputs -> the core's sequence_lens, when the graph has them
        self.whole_graph = whole  # the original, for ONNX Runtime as backend (families/imported.py WholeGraphRunner)
        self.inputs, self.outputs = spec["inputs"], spec["outputs"]
        self._front = ort_session(onnx.load_from_string(front)) if front else None
        self._head = ort_session(onnx.load_from_string(head)) if head else None
        self._lengths = ort_session(onnx.load_from_string(lengths)) if lengths else None
        self._head_feeds = [i.name for i in self._head.get_inputs()] if self._head else []

    @property
    def streamable(self) -> bool:
        """Chunks of a sequence give what one pass gives (unidirectional core, per-step front and head):
        the model can serve stateful sessions."""
        return bool(self.spec["streamable"])

    # --- one row: what the frame runners need (engine/frames.py) -------------------------------
    def frames_of(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """One row's graph inputs (batch axes of size 1) -> the core's input frames (T, F)."""
        if self._front is None:
            x = inputs[self.spec["core_input"]]
        else:
            x = self._front.run([self.spec["core_input"]], self._feeds(self._front, inputs))[0]
        if x.ndim != 3 or x.shape[1] != 1 or x.shape[2] != self.rnn.input_size:
            raise ValueError(f"the front produced shape {list(x.shape)} for the core, which takes "
                             f"[T, 1, {self.rnn.input_size}]")
        if self._lengths is not None:  # run only the row's own steps; result_of pads the core's outputs back
            n = int(np.asarray(self._lengths.run(None, self._feeds(self._lengths, inputs))[0]).reshape(-1)[0])
            if not 1 <= n <= len(x):
                raise ValueError(f"sequence length {n} is outside [1, {len(x)}] (the row's steps)")
            inputs[self.PADDED_STEPS] = len(x)
            x = x[:n]
        return np.ascontiguousarray(x[:, 0], dtype=np.float32)

    def result_of(self, inputs: dict[str, np.ndarray], ys: np.ndarray, finals: list[tuple]) -> dict[str, np.ndarray]:
        """One row's graph outputs from its inputs, the top layer's outputs ys (T, D*H) and the final
        state of every cell (finals[l * D + d] = (h[, c]), each (H,))."""
        core = self._core_tensors(ys, finals, inputs.get(self.PADDED_STEPS))
        outputs = {}
        if self._head is not None:
            feeds = {name: core[name] if name in core else inputs[name] for name in self._head_feeds}
            names = [o.name for o in self._head.get_outputs()]
            outputs.update(zip(names, self._head.run(names, feeds)))
        for spec in self.outputs:  # graph outputs that are core tensors or inputs themselves
            if spec["name"] not in outputs:
                outputs[spec["name"]] = core[spec["name"]] if spec["name"] in core else inputs[spec["name"]]
        return outputs

    def _core_tensors(self, ys: np.ndarray, finals: list[tuple], padded_steps: int | None) -> dict[str, np.ndarray]:
        """The core's outputs in ONNX layouts: Y [T, D, 1, H] (zeros past the row's length, as ONNX has
        it), Y_h / Y_c [D, 1, H] (the state at the row's last step)."""
        dirs, hidden = self.rnn.num_directions, self.rnn.hidden_size
        out = {}
        for source in self.spec["core_outputs"]:
            if source["kind"] == "Y":
                y = np.zeros((padded_steps or len(ys), dirs, 1, hidden), np.float32)
                y[: len(ys)] = ys.reshape(len(ys), dirs, 1, hidden)
                out[source["name"]] = y
            else:
                layer, which = source["layer"], 0 if source["kind"] == "Y_h" else 1
                out[source["name"]] = np.stack([finals[layer * dirs + d][which] for d in range(dirs)])[:, None]
        return out

    @staticmethod
    def _feeds(session, inputs):
        return {i.name: inputs[i.name] for i in session.get_inputs()}

    # --- whole requests ---------------------------------------------------------------------------------
    def rows(self, tensors: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """A request's input tensors, checked against the graph's, cut into rows along their batch axes
        (each keeps its batch axis, of size 1). ValueError names what is wrong."""
        unknown = set(tensors) - {s["name"] for s in self.inputs}
        if unknown:
            raise ValueError(f"unknown input(s) {sorted(unknown)}; the model takes {[s['name'] for s in self.inputs]}")
        batch = None
        for spec in self.inputs:
            name = spec["name"]
            if name not in tensors:
                raise ValueError(f"the model needs input {name!r}")
            value = tensors[name]
            if value.dtype != NUMPY[spec["datatype"]]:
                raise ValueError(f"input {name!r} must be {spec['datatype']}, got {value.dtype}")
            if value.ndim != len(spec["shape"]) or any(d >= 0 and d != n for d, n in zip(spec["shape"], value.shape)):
                raise ValueError(f"input {name!r} must have shape {spec['shape']} (-1: any), got {list(value.shape)}")
            if spec["time_axis"] is not None and value.shape[spec["time_axis"]] < 1:
                raise ValueError(f"input {name!r} has no time steps")
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise ValueError(f"input {name!r} contains NaN or infinity")
            if spec["batch_axis"] is not None:
                n = value.shape[spec["batch_axis"]]
                if batch is not None and n != batch:
                    raise ValueError(f"inputs disagree on the batch size ({batch} vs {n} in {name!r})")
                batch = n
        if self.spec["vocab"]:
            for name, size in self.spec["vocab"].items():
                ids = tensors[name]
                if ids.size and (ids.min() < 0 or ids.max() >= size):
                    raise ValueError(f"input {name!r} holds ids outside [0, {size})")
        out = []
        for b in range(batch or 1):
            row = {}
            for spec in self.inputs:
                value, axis = tensors[spec["name"]], spec["batch_axis"]
                row[spec["name"]] = value if axis is None else np.take(value, [b], axis=axis)
            out.append(row)
        return out

    def join(self, rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Rows' graph outputs concatenated along each output's batch axis."""
        out = {}
        for spec in self.outputs:
            parts = [r[spec["name"]] for r in rows]
            out[spec["name"]] = parts[0] if spec["batch_axis"] is None else np.concatenate(parts, axis=spec["batch_axis"])
        return out

    def core(self, row: dict[str, np.ndarray]) -> tuple[np.ndarray, list[tuple]]:
        """One row through front and core, without the engine: (ys (T, D*H), finals) for result_of."""
        frames = self.frames_of(row)
        ys, finals = self.rnn.forward(frames[:, None])
        return ys[:, 0], [tuple(s[0] for s in state) for state in finals]

    def forward(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The whole model on a request, row by row, without the engine (reference runs and the import
        check)."""
        return self.join([self.result_of(row, *self.core(row)) for row in self.rows(tensors)])

    # --- our file format -------------------------------------------------------------------------------
    @property
    def weight_bytes(self) -> int:
        """What serving holds: our core's weights and the front and head graphs."""
        return self.rnn.weight_bytes + len(self.front_graph) + len(self.head_graph) + len(self.lengths_graph)

    def config(self) -> dict:
        return {"arch": self.arch, "rnn": self.rnn.config(), "spec": json.dumps(self.spec)}

    def tensors(self) -> dict:
        return {**prefixed("rnn", self.rnn.tensors()), "graph.front": np.frombuffer(self.front_graph, np.uint8),
                "graph.head": np.frombuffer(self.head_graph, np.uint8),
                "graph.whole": np.frombuffer(self.whole_graph, np.uint8),
                "graph.lengths": np.frombuffer(self.lengths_graph, np.uint8)}

    @classmethod
    def from_tensors(cls, config, tensors):
        return cls(tensors["graph.front"].tobytes(), tensors["graph.head"].tobytes(),
                   RNN.from_tensors(config["rnn"], unprefixed("rnn", tensors)), json.loads(config["spec"]),
                   tensors["graph.whole"].tobytes(), tensors.get("graph.lengths", np.zeros(0, np.uint8)).tobytes())
