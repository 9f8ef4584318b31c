"""A recurrent cell executed by ONNX Runtime, with our cell interface, so the engine and models run on
either backend unchanged (per-model `backend: onnxruntime` or `onnxruntime-int8`); and the ONNX Runtime
session settings every part of cellserve uses."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from cellserve.cells.base import Cell


def ort_session(model: onnx.ModelProto, threads: int = 1):
    """An ONNX Runtime CPU session with a fixed number of intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: cut-out graphs keep initializers ORT reports as unused
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


class OnnxRuntimeCell(Cell):
    """An LSTM/GRU cell executed by ONNX Runtime, with our cell interface, so the engine and models run on
    either backend unchanged (per-model `backend: onnxruntime` or `onnxruntime-int8`)."""

    def __init__(self, cell: Cell, graph, threads: int = 1, int8: bool = False):
        """graph: the cell as a one-layer ONNX LSTM/GRU (X, h0[, c0] -> Y, hN[, cN]; interop/onnx_export.py
        builds it); int8: the graph holds ORT's quantized operators, and its weights are what it holds."""
        self.cell, self.kind, self.int8 = cell, cell.kind, int8
        self.input_size, self.hidden_size = cell.input_size, cell.hidden_size
        self.graph_weight_bytes = sum(numpy_helper.to_array(t).nbytes for t in graph.graph.initializer)
        self.session = ort_session(graph, threads)

    def state_widths(self):
        return self.cell.state_widths()

    def zero_state(self, batch):
        return self.cell.zero_state(batch)

    def options(self):
        return self.cell.options()

    def tensors(self):
        return self.cell.tensors()

    @property
    def weight_bytes(self):
        return self.graph_weight_bytes if self.int8 else self.cell.weight_bytes

    def step(self, x, state):
        return self.steps(x[None], state)[1]

    def steps(self, xs, state):
        feeds = {"X": np.ascontiguousarray(xs, dtype=np.float32), "h0": np.ascontiguousarray(state[0][None])}
        if self.kind == "lstm":
            feeds["c0"] = np.ascontiguousarray(state[1][None])
        out = self.session.run(None, feeds)
        return out[0], tuple(o[0] for o in out[1:])
