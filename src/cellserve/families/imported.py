"""The imported-graph family: an ONNX graph behind its own tensors (the names, datatypes and shapes of
the original), so a client written for Triton + ONNX Runtime works unchanged. A request's rows (along
each tensor's batch axis) run as separate engine requests on the frames runners; a streaming graph also
serves sessions. Optionally its scores are decoded (CTC labels, LM log-likelihood). With backend
`onnxruntime`, ONNX Runtime runs the whole original graph per request-level batch instead
(WholeGraphRunner): the Triton + ONNX Runtime way, and the peer its benchmark compares with."""

from __future__ import annotations

import time

import numpy as np

from cellserve.engine.frames import frames_runner
from cellserve.engine.request import Request
from cellserve.engine.runner import ADMITTED, Runner
from cellserve.families.base import SNAPSHOT, Family, TensorSpec
from cellserve.families.decoding import ctc_greedy, log_likelihood
from cellserve.models.imported import ImportedModel

EXTRA_OUTPUTS = {"ctc": TensorSpec("labels", "INT64", [-1, -1]), "lm": TensorSpec("log_likelihood", "FP64", [-1])}


class ImportedFamily(Family):
    """A graph with state inputs and outputs (state -> stateN, h/c -> hn/cn) serves sessions with the
    state held by the server: a session's requests send only their chunk, the state inputs start from
    zeros, and the state outputs are not returned. A request without a session may send the state itself
    (and gets the state outputs back); its rows still batch with everyone's. `context` ({input: samples})
    keeps, per session, the last samples of an input's previous chunk and puts them before the next."""

    arch = "onnx"
    options = ("decode", "sequence_batching", "backend", "context")

    def __init__(self, model: ImportedModel, decode: str | None = None, sequence_batching: bool | None = None,
                 backend: str = "cellserve", context: dict[str, int] | None = None):
        super().__init__(model)
        self.context = dict(context or {})
        names = {i["name"] for i in model.inputs}
        for name, n in self.context.items():
            if name not in names or n < 1:
                raise ValueError(f"context names input {name!r} with {n} samples; the graph's inputs are {sorted(names)}")
        self.session_hidden = tuple(p["output"] for p in model.state_pairs if p["output"])
        # sessions of a graph with its own state or a context need the front in order, per session, and
        # their short chunks gain most from one front call per step; whole sequences run theirs on the
        # submitting thread, beside the engine (see engine/frames.py front_at_admission)
        self.front_in_engine = bool(model.state_pairs or self.context)
        self.rnn = model.rnn
        if backend not in ("cellserve", "onnxruntime"):
            raise ValueError(f"backend {backend!r} does not run imported graphs (cellserve or onnxruntime)")
        if sequence_batching and not model.streamable:
            raise ValueError("sequence batching needs a graph that streams (unidirectional core, and a front and "
                             "head that work step by step, so chunks give what one pass gives); this one does not")
        self.backend = backend
        self.decode = decode
        self.scores = next((o for o in model.outputs if o["time_axis"] is not None and o["datatype"].startswith("FP")),
                           None)
        self.tokens = next((i for i in model.inputs if i["time_axis"] is not None and i["datatype"].startswith("INT")),
                           None)
        if decode is not None:
            if decode not in EXTRA_OUTPUTS:
                raise ValueError(f"decode must be one of {sorted(EXTRA_OUTPUTS)}, not {decode!r}")
            if self.scores is None:
                raise ValueError(f"{decode} decoding needs a floating-point output with a time axis")
            if decode == "lm" and self.tokens is None:
                raise ValueError("LM scoring needs an integer input with a time axis (the tokens)")
        self.stateful = backend == "cellserve" and (
            model.streamable if sequence_batching is None else sequence_batching)
        state_inputs = {p["input"] for p in model.state_pairs}
        self.inputs = [TensorSpec(i["name"], i["datatype"], self._client_shape(i), optional=i["name"] in state_inputs)
                       for i in model.inputs]
        self.outputs = [TensorSpec(o["name"], o["datatype"], o["shape"]) for o in model.outputs]
        if decode:
            self.outputs.append(EXTRA_OUTPUTS[decode])
        if self.stateful:
            self.inputs.append(SNAPSHOT)
            self.outputs.append(SNAPSHOT)

    def runner(self, capacity, block_steps=1, step_loop="native"):
        if self.backend == "onnxruntime":
            return WholeGraphRunner(self.model, capacity)
        return frames_runner(self, capacity, block_steps, step_loop)

    def _client_shape(self, spec: dict) -> list[int]:
        """An input's shape as clients send it: its context comes from the server."""
        shape = list(spec["shape"])
        if spec["name"] in self.context and shape and shape[-1] >= 0:
            shape[-1] -= self.context[spec["name"]]
        return shape

    def requests(self, tensors):
        return self.model.rows({k: v for k, v in tensors.items() if k != SNAPSHOT.name}, self.context)

    @property
    def compute_seconds(self) -> float:
        """Time the graph's front and head have spent in ONNX Runtime (the engine's kernel time, not overhead)."""
        return self.model.compute_seconds

    def frames_batch(self, rows: list[dict]) -> list[np.ndarray]:
        return self.model.frames_batch(rows)

    def initial_states(self, rows: list[dict]) -> list:
        return self.model.initial_states(rows)

    def results_batch(self, rows: list[dict], ys: list[np.ndarray], finals: list) -> list[dict]:
        results = self.model.results_batch(rows, ys, finals)
        if self.decode:
            for row, outputs in zip(rows, results):
                outputs.update(self._decoded(row, outputs))
        return results

    def frames_of(self, inputs: dict) -> np.ndarray:
        return self.model.frames_of(inputs)

    def result_of(self, inputs: dict, ys: np.ndarray, finals: list) -> dict:
        return self.results_batch([inputs], [ys], [finals])[0]

    def _decoded(self, inputs: dict, outputs: dict) -> dict:
        """One row's extra output: CTC greedy labels ("labels": best path, repeats merged, blanks (id 0)
        dropped) or the LM log-likelihood of the token input, from the first floating-point output with a
        time axis."""
        spec = self.scores
        scores = np.moveaxis(outputs[spec["name"]], spec["time_axis"], 0)
        if spec["batch_axis"] is not None:  # (T, ..., 1, ..., C) -> (T, C)
            scores = scores.reshape(scores.shape[0], -1, scores.shape[-1])[:, 0]
        if self.decode == "ctc":
            return {"labels": np.array([ctc_greedy(scores.argmax(axis=-1))], dtype=np.int64).reshape(1, -1)}
        tokens = np.moveaxis(inputs[self.tokens["name"]], self.tokens["time_axis"], 0).reshape(-1)
        return {"log_likelihood": np.array([log_likelihood(scores, tokens)], np.float64)}

    def forward(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A request's outputs, decoding included, without the engine (reference runs)."""
        return self.outputs_of([self.result_of(row, *self.model.core(row)) for row in self.requests(tensors)])

    def outputs_of(self, results):
        outputs = self.model.join(results)
        if self.decode == "ctc":  # rows of labels padded with -1
            width = max(r["labels"].shape[1] for r in results)
            outputs["labels"] = np.full((len(results), width), -1, np.int64)
            for i, r in enumerate(results):
                outputs["labels"][i, : r["labels"].shape[1]] = r["labels"][0]
        elif self.decode == "lm":
            outputs["log_likelihood"] = np.concatenate([r["log_likelihood"] for r in results])
        return outputs


class WholeGraphRunner(Runner):
    """ONNX Runtime running an imported model's original graph, one call per batch of requests, their rows
    padded with zeros along the time axis to the longest and cut back after: what Triton + ONNX Runtime
    do under dynamic batching (the graph policy). The serving backend `onnxruntime` of an imported model,
    and the peer its benchmark compares with."""

    cell_types = ("graph",)
    pads = False  # the batch is what was admitted; padding is along time

    def __init__(self, model, capacity: int):
        import onnx

        from cellserve.cells.onnxruntime import ort_session

        if not model.whole_graph:
            raise ValueError("this imported model was saved without its original graph")
        super().__init__(capacity)
        self.model = model
        self.session = ort_session(onnx.load_from_string(model.whole_graph))
        self.waiting: list[Request] = []
        self._time_lengths: dict[int, dict[str, int]] = {}  # input steps -> each output's steps

    def prepare(self, inputs):
        rows = self.model.rows(inputs)
        if len(rows) != 1:
            raise ValueError("an engine request is one row")
        return rows[0], 1

    def length(self, payload):
        return self._steps(payload)

    def _steps(self, row: dict) -> int:
        timed = next((s for s in self.model.inputs if s["time_axis"] is not None), None)
        return 1 if timed is None else row[timed["name"]].shape[timed["time_axis"]]

    def _admit(self, req):
        self.waiting.append(req)
        return ADMITTED

    def ready(self, cell_type):
        return len(self.waiting)

    def oldest(self, cell_type):
        return min(r.arrival for r in self.waiting)

    @property
    def used(self):
        return len(self.waiting)

    def drop(self, req):
        if req in self.waiting:
            self.waiting.remove(req)

    def step(self, cell_type, max_rows, pad_to=0):
        batch, self.waiting = self.waiting[:max_rows], self.waiting[max_rows:]
        dropped = [r for r in batch if self.cancel_flags[r.ticket]]
        batch = [r for r in batch if not self.cancel_flags[r.ticket]]
        self.last_padding = 0.0
        if batch:
            steps = [self._steps(r.payload) for r in batch]
            start = time.perf_counter()
            outputs = self.session.run(None, self._feeds([r.payload for r in batch], max(steps)))
            self.kernel_seconds += time.perf_counter() - start
            self.last_padding = len(batch) - sum(steps) / max(steps)  # time steps of padding, as rows
            for i, (req, n) in enumerate(zip(batch, steps)):
                lengths = self._output_steps(n, req.payload)
                req.result = {}
                for spec, value in zip(self.model.outputs, outputs):
                    row = np.take(value, [i], axis=spec["batch_axis"]) if spec["batch_axis"] is not None else value
                    if spec["time_axis"] is not None:
                        row = np.take(row, range(lengths[spec["name"]]), axis=spec["time_axis"])
                    req.result[spec["name"]] = row
        self.last_rows = len(batch)
        return dropped + batch

    def _feeds(self, rows: list[dict], steps: int) -> dict:
        feeds = {}
        for spec in self.model.inputs:
            parts = [r[spec["name"]] for r in rows]
            if spec["time_axis"] is not None:
                parts = [np.pad(p, [(0, steps - p.shape[a]) if a == spec["time_axis"] else (0, 0) for a in range(p.ndim)])
                         for p in parts]
            feeds[spec["name"]] = parts[0] if spec["batch_axis"] is None else np.concatenate(parts, spec["batch_axis"])
        return feeds

    def _output_steps(self, n: int, row: dict) -> dict[str, int]:
        """Each output's steps for an input of n steps (the graph run alone on zeros, once per length)."""
        if n not in self._time_lengths:
            outputs = self.session.run(None, self._feeds([{k: np.zeros_like(v) for k, v in row.items()}], n))
            self._time_lengths[n] = {s["name"]: o.shape[s["time_axis"]] for s, o in zip(self.model.outputs, outputs)
                                     if s["time_axis"] is not None}
        return self._time_lengths[n]
