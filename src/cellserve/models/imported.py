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

import time

import json

import numpy as np
import onnx

from cellserve.cells.onnxruntime import ort_session
from cellserve.models.rnn import RNN, prefixed, unprefixed

NUMPY = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32,
         "INT16": np.int16, "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_}


class ImportedModel:
    """An imported graph: front and head (serialized ONNX, run by ONNX Runtime) around `rnn`, our cells.
    `spec` describes the graph's tensors and how the core's outputs feed the head (see import_onnx). A
    graph whose core starts from a state it reads from inputs (state -> stateN) has a third cut-out,
    `states_graph`: those inputs -> the core's initial states.

    Front, head and states run batched: rows (a request's rows, or the rows an engine step admits or
    finishes) of the same shapes are concatenated along the graph's batch axis and run in one call."""

    arch = "onnx"
    PADDED_STEPS = "cellserve.padded_steps"  # kept in a row's inputs by frames_batch when lengths cut it

    def __init__(self, front: bytes, head: bytes, rnn: RNN, spec: dict, whole: bytes = b"", lengths: bytes = b"",
                 states: bytes = b""):
        self.front_graph, self.head_graph, self.rnn, self.spec = front, head, rnn, spec
        self.lengths_graph = lengths  # graph inputs -> the core's sequence_lens, when the graph has them
        self.states_graph = states  # state inputs -> the core's initial states, when the graph has them
        self.whole_graph = whole  # the (normalized) original, for ONNX Runtime as backend (WholeGraphRunner)
        self.inputs, self.outputs = spec["inputs"], spec["outputs"]
        self._front = ort_session(onnx.load_from_string(front)) if front else None
        self._head = ort_session(onnx.load_from_string(head)) if head else None
        self._lengths = ort_session(onnx.load_from_string(lengths)) if lengths else None
        self._states = ort_session(onnx.load_from_string(states)) if states else None
        self._head_feeds = [i.name for i in self._head.get_inputs()] if self._head else []
        self.compute_seconds = 0.0  # inside ONNX Runtime (front, head, lengths, states): the model's compute

    def _run(self, session, names, feeds) -> list:
        start = time.perf_counter()
        try:
            return session.run(names, feeds)
        finally:
            self.compute_seconds += time.perf_counter() - start

    @property
    def streamable(self) -> bool:
        """Chunks of a sequence give what one pass gives (unidirectional core, per-step front and head, or
        a state the graph carries itself): the model can serve stateful sessions."""
        return bool(self.spec["streamable"])

    @property
    def state_pairs(self) -> list[dict]:
        """[{"input": state input, "output": the graph output that continues it (or None)}]"""
        return self.spec.get("state", [])

    # --- rows, batched: what the frame runners need (engine/frames.py) -----------------------------
    @property
    def batchable(self) -> bool:
        """Exported with a batch dimension (found at import), so rows can share a call."""
        return self.spec.get("symbols", {}).get("batch") is not None

    @property
    def _axis(self) -> dict[str, int | None]:
        """Batch axis of every tensor rows are stacked along: graph inputs and outputs, core outputs."""
        axes = {s["name"]: s["batch_axis"] for s in self.inputs + self.outputs}
        axes.update({o["name"]: 2 if o["kind"] == "Y" else 1 for o in self.spec["core_outputs"]})
        return axes

    def _groups(self, rows: list[dict], names: list[str]) -> list[list[int]]:
        """Rows that can run in one call: same shapes of every input in `names`, same values of inputs
        without a batch axis (each row alone when the graph was exported for batch 1)."""
        if not self.batchable:
            return [[i] for i in range(len(rows))]
        groups: dict[tuple, list[int]] = {}
        axes = self._axis
        for i, row in enumerate(rows):
            key = tuple((n, row[n].shape, row[n].tobytes() if axes.get(n) is None else None)
                        for n in names if n in row)
            groups.setdefault(key, []).append(i)
        return list(groups.values())

    def _stack(self, rows: list[dict], names: list[str], group: list[int]) -> dict[str, np.ndarray]:
        feeds, axes = {}, self._axis
        for n in names:
            axis = axes.get(n)
            parts = [rows[i][n] for i in group]
            feeds[n] = parts[0] if axis is None else np.concatenate(parts, axis=axis)
        return feeds

    def frames_batch(self, rows: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
        """Rows' graph inputs (batch axes of size 1) -> each row's core input frames (T, F)."""
        core_input = self.spec["core_input"]
        names = [i.name for i in self._front.get_inputs()] if self._front else [core_input]
        if self._lengths is not None:
            names += [i.name for i in self._lengths.get_inputs() if i.name not in names]
        out: list[np.ndarray] = [None] * len(rows)
        for group in self._groups(rows, names):
            feeds = self._stack(rows, names, group)
            x = feeds[core_input] if self._front is None else self._run(self._front, [core_input], self._feeds(self._front, feeds))[0]
            if x.ndim != 3 or x.shape[1] != len(group) or x.shape[2] != self.rnn.input_size:
                raise ValueError(f"the front produced shape {list(x.shape)} for the core, which takes "
                                 f"[T, {len(group)}, {self.rnn.input_size}]")
            steps = None
            if self._lengths is not None:  # run only a row's own steps; results_batch pads the core's outputs back
                steps = np.asarray(self._run(self._lengths, None, self._feeds(self._lengths, feeds))[0]).reshape(-1)
            for k, i in enumerate(group):
                frames = x[:, k]
                if steps is not None:
                    n = int(steps[k])
                    if not 1 <= n <= len(frames):
                        raise ValueError(f"sequence length {n} is outside [1, {len(frames)}] (the row's steps)")
                    rows[i][self.PADDED_STEPS] = len(frames)
                    frames = frames[:n]
                out[i] = np.ascontiguousarray(frames, dtype=np.float32)
        return out

    def initial_states(self, rows: list[dict[str, np.ndarray]]) -> list[list[tuple] | None]:
        """Each row's initial state per cell ((h[, c]) of shape (H,)) from its state inputs, or None for a
        row that gives none (it starts from zeros, or from its session's state)."""
        out: list[list[tuple] | None] = [None] * len(rows)
        if self._states is None:
            return out
        names = [i.name for i in self._states.get_inputs()]
        given = [i for i, row in enumerate(rows) if all(n in row for n in names)]
        dirs = self.rnn.num_directions
        for group in self._groups([rows[i] for i in given], names):
            members = [given[k] for k in group]
            values = self._run(self._states, None, self._stack(rows, names, members))
            for k, i in enumerate(members):
                state = [[np.zeros(w, np.float32) for w in cell.state_widths()] for cell in self.rnn.cells]
                for source, value in zip(self.spec["state_sources"], values):
                    for d in range(dirs):
                        state[source["layer"] * dirs + d][0 if source["kind"] == "h" else 1] = value[d, k]
                out[i] = [tuple(s) for s in state]
        return out

    def results_batch(self, rows: list[dict[str, np.ndarray]], ys: list[np.ndarray],
                      finals: list[list[tuple]]) -> list[dict[str, np.ndarray]]:
        """Each row's graph outputs from its inputs, its top layer's outputs ys (T, D*H) and the final
        state of every cell (finals[l * D + d] = (h[, c]), each (H,))."""
        core = [self._core_tensors(y, f, row.get(self.PADDED_STEPS)) for row, y, f in zip(rows, ys, finals)]
        joined = [{**row, **c} for row, c in zip(rows, core)]
        out = [dict() for _ in rows]
        if self._head is not None:
            names = [o.name for o in self._head.get_outputs()]
            axes = self._axis
            for group in self._groups(joined, self._head_feeds):
                values = self._run(self._head, names, self._stack(joined, self._head_feeds, group))
                for name, value in zip(names, values):
                    axis = axes.get(name)
                    for k, i in enumerate(group):
                        out[i][name] = value if axis is None else _one(value, k, axis)
        for spec in self.outputs:  # graph outputs that are core tensors or inputs themselves
            for i, row in enumerate(joined):
                if spec["name"] not in out[i]:
                    out[i][spec["name"]] = row[spec["name"]]
        return out

    # --- rows already stacked (the stream lane's step: one call over every row of a step) ----------------
    def front_stacked(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Graph inputs stacked along their batch axes -> the core's input frames [T, B, F]."""
        if self._front is None:
            return feeds[self.spec["core_input"]]
        return self._run(self._front, [self.spec["core_input"]], self._feeds(self._front, feeds))[0]

    def head_stacked(self, feeds: dict[str, np.ndarray], ys: np.ndarray, finals: list[tuple],
                     names: list[str]) -> list[np.ndarray]:
        """The head's outputs `names` for B rows at once: graph inputs `feeds`, the top layer's outputs ys
        [T, B, D*H] and every cell's final state (finals[l * D + d] = (h[, c]), each [B, H])."""
        dirs, hidden = self.rnn.num_directions, self.rnn.hidden_size
        feeds = dict(feeds)
        for source in self.spec["core_outputs"]:
            if source["kind"] == "Y":  # ONNX's [T, D, B, H]
                feeds[source["name"]] = np.ascontiguousarray(
                    ys.reshape(len(ys), -1, dirs, hidden).transpose(0, 2, 1, 3))
            else:
                which = 0 if source["kind"] == "Y_h" else 1
                feeds[source["name"]] = np.stack([finals[source["layer"] * dirs + d][which] for d in range(dirs)])
        return self._run(self._head, names, {n: feeds[n] for n in self._head_feeds})

    def frames_of(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """One row's core input frames (T, F)."""
        return self.frames_batch([inputs])[0]

    def result_of(self, inputs: dict[str, np.ndarray], ys: np.ndarray, finals: list[tuple]) -> dict[str, np.ndarray]:
        """One row's graph outputs (see results_batch)."""
        return self.results_batch([inputs], [ys], [finals])[0]

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
    def rows(self, tensors: dict[str, np.ndarray], context: dict[str, int] | None = None) -> list[dict[str, np.ndarray]]:
        """A request's input tensors, checked against the graph's, cut into rows along their batch axes
        (each keeps its batch axis, of size 1). ValueError names what is wrong. context: inputs whose last
        axis comes this many samples short (the server puts a session's context before them)."""
        unknown = set(tensors) - {s["name"] for s in self.inputs}
        if unknown:
            raise ValueError(f"unknown input(s) {sorted(unknown)}; the model takes {[s['name'] for s in self.inputs]}")
        batch = None
        optional = {pair["input"] for pair in self.state_pairs}  # missing: the state starts from zeros
        for spec in self.inputs:
            name = spec["name"]
            if name not in tensors:
                if name in optional:
                    continue
                raise ValueError(f"the model needs input {name!r}")
            value = tensors[name]
            if value.dtype != NUMPY[spec["datatype"]]:
                raise ValueError(f"input {name!r} must be {spec['datatype']}, got {value.dtype}")
            shape = list(spec["shape"])
            if context and name in context and shape and shape[-1] >= 0:
                shape[-1] -= context[name]
            if value.ndim != len(shape) or any(d >= 0 and d != n for d, n in zip(shape, value.shape)):
                raise ValueError(f"input {name!r} must have shape {shape} (-1: any), got {list(value.shape)}")
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
                if spec["name"] in tensors:
                    value, axis = tensors[spec["name"]], spec["batch_axis"]
                    row[spec["name"]] = value if axis is None else _one(value, b, axis)
            out.append(row)
        return out

    def join(self, rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Rows' graph outputs concatenated along each output's batch axis."""
        out = {}
        for spec in self.outputs:
            parts = [r[spec["name"]] for r in rows if spec["name"] in r]  # a session's hidden state is not in its rows
            if parts:
                out[spec["name"]] = parts[0] if spec["batch_axis"] is None else np.concatenate(parts, axis=spec["batch_axis"])
        return out

    def core(self, row: dict[str, np.ndarray]) -> tuple[np.ndarray, list[tuple]]:
        """One row through front and core, without the engine: (ys (T, D*H), finals) for result_of."""
        frames = self.frames_of(row)
        initial = self.initial_states([row])[0]
        state = None if initial is None else [tuple(v[None] for v in cell) for cell in initial]
        ys, finals = self.rnn.forward(frames[:, None], state)
        return ys[:, 0], [tuple(s[0] for s in state) for state in finals]

    def forward(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The whole model on a request, row by row, without the engine (reference runs and the import
        check)."""
        return self.join([self.result_of(row, *self.core(row)) for row in self.rows(tensors)])

    # --- our file format -------------------------------------------------------------------------------
    @property
    def weight_bytes(self) -> int:
        """What serving holds: our core's weights and the front and head graphs."""
        return (self.rnn.weight_bytes + len(self.front_graph) + len(self.head_graph) + len(self.lengths_graph)
                + len(self.states_graph))

    def config(self) -> dict:
        return {"arch": self.arch, "rnn": self.rnn.config(), "spec": json.dumps(self.spec)}

    def tensors(self) -> dict:
        return {**prefixed("rnn", self.rnn.tensors()), "graph.front": np.frombuffer(self.front_graph, np.uint8),
                "graph.head": np.frombuffer(self.head_graph, np.uint8),
                "graph.whole": np.frombuffer(self.whole_graph, np.uint8),
                "graph.lengths": np.frombuffer(self.lengths_graph, np.uint8),
                "graph.states": np.frombuffer(self.states_graph, np.uint8)}

    @classmethod
    def from_tensors(cls, config, tensors):
        return cls(tensors["graph.front"].tobytes(), tensors["graph.head"].tobytes(),
                   RNN.from_tensors(config["rnn"], unprefixed("rnn", tensors)), json.loads(config["spec"]),
                   tensors["graph.whole"].tobytes(), tensors.get("graph.lengths", np.zeros(0, np.uint8)).tobytes(),
                   tensors.get("graph.states", np.zeros(0, np.uint8)).tobytes())


def _one(value: np.ndarray, index: int, axis: int) -> np.ndarray:
    """Row `index` of a batch along `axis`, keeping the axis (size 1): a view (np.take copies, at 2-3 us)."""
    return value[(slice(None),) * axis + (slice(index, index + 1),)]
