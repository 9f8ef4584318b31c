"""Export our recurrent models to ONNX, using the standard LSTM/GRU operators where they exist and
primitive operators (MatMul, Sigmoid, Tanh, ...) for SRU. Needs the `onnx` package."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cellserve.cells import Cell, GRUCell, LSTMCell, SRUCell
from cellserve.models.rnn import RNN, rnns_of

OPSET = 18
IR_VERSION = 8  # enough for opset 18; runtimes reject IR versions newer than they know
# Block orders: torch LSTM [i, f, g, o] -> ONNX [i, o, f, c]; torch GRU [r, z, n] -> ONNX [z, r, h].
_ORDER = {"lstm": [0, 3, 1, 2], "gru": [1, 0, 2]}


def _reorder(a: np.ndarray, kind: str) -> np.ndarray:
    blocks = np.split(a, len(_ORDER[kind]), axis=0)
    return np.concatenate([blocks[i] for i in _ORDER[kind]], axis=0)


def _rnn_op_weights(kind: str, dirs: list[Cell]):
    """W [D, G*H, in], R [D, G*H, H], B [D, 2*G*H] in ONNX gate order."""
    w = np.stack([_reorder(c.ih.dense_weight(), kind) for c in dirs])  # quantized cells export dequantized
    r = np.stack([_reorder(c.hh.dense_weight(), kind) for c in dirs])
    if kind == "lstm":
        b = np.stack([np.concatenate([_reorder(c.bias, kind), np.zeros_like(c.bias)]) for c in dirs])
    else:
        b = np.stack([np.concatenate([_reorder(c.b_ih, kind), _reorder(c.b_hh, kind)]) for c in dirs])
    return w.astype(np.float32), r.astype(np.float32), b.astype(np.float32)


def _model(nodes, inputs, outputs, initializers, name) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="cellserve",
                              ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


def rnn_to_onnx(rnn: RNN) -> onnx.ModelProto:
    """A stacked (bi)LSTM/GRU: input X [T, B, in], initial states h0 (and c0) [L*D, B, H];
    outputs Y [T, B, D*H] and final hN (and cN) [L*D, B, H], in our state order."""
    kind = rnn.cell_kind
    if kind not in _ORDER:
        raise ValueError(f"ONNX has no standard {kind} operator; export it with cell_step_to_onnx")
    dirs, hidden, lstm = rnn.num_directions, rnn.hidden_size, kind == "lstm"
    nodes, inits = [], []
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", "B", rnn.input_size]),
              helper.make_tensor_value_info("h0", TensorProto.FLOAT, [rnn.num_layers * dirs, "B", hidden])]
    if lstm:
        inputs.append(helper.make_tensor_value_info("c0", TensorProto.FLOAT, [rnn.num_layers * dirs, "B", hidden]))
    inits.append(numpy_helper.from_array(np.array([0, 0, -1], dtype=np.int64), "flat_dirs"))
    x, finals_h, finals_c = "X", [], []
    for l, cells in enumerate(rnn.layers):
        w, r, b = _rnn_op_weights(kind, cells)
        for name, arr in (("W", w), ("R", r), ("B", b)):
            inits.append(numpy_helper.from_array(arr, f"{name}{l}"))
        nodes.append(helper.make_node("Slice", ["h0", f"range{l}_s", f"range{l}_e"], [f"h0_{l}"]))
        inits += [numpy_helper.from_array(np.array([l * dirs], dtype=np.int64), f"range{l}_s"),
                  numpy_helper.from_array(np.array([(l + 1) * dirs], dtype=np.int64), f"range{l}_e")]
        op_inputs = [x, f"W{l}", f"R{l}", f"B{l}", "", f"h0_{l}"]
        outs = [f"Y{l}", f"hN{l}"]
        if lstm:
            nodes.append(helper.make_node("Slice", ["c0", f"range{l}_s", f"range{l}_e"], [f"c0_{l}"]))
            op_inputs.append(f"c0_{l}")
            outs.append(f"cN{l}")
        attrs = {"hidden_size": hidden, "direction": "bidirectional" if dirs == 2 else "forward"}
        if not lstm:
            attrs["linear_before_reset"] = 1
        nodes.append(helper.make_node(kind.upper(), op_inputs, outs, **attrs))
        # Y [T, D, B, H] -> [T, B, D*H]
        nodes.append(helper.make_node("Transpose", [f"Y{l}"], [f"Yt{l}"], perm=[0, 2, 1, 3]))
        nodes.append(helper.make_node("Reshape", [f"Yt{l}", "flat_dirs"], [f"X{l + 1}"]))
        x = f"X{l + 1}"
        finals_h.append(f"hN{l}")
        finals_c.append(f"cN{l}")
    nodes.append(helper.make_node("Identity", [x], ["Y"]))
    nodes.append(helper.make_node("Concat", finals_h, ["hN"], axis=0))
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["T", "B", dirs * hidden]),
               helper.make_tensor_value_info("hN", TensorProto.FLOAT, [rnn.num_layers * dirs, "B", hidden])]
    if lstm:
        nodes.append(helper.make_node("Concat", finals_c, ["cN"], axis=0))
        outputs.append(helper.make_tensor_value_info("cN", TensorProto.FLOAT, [rnn.num_layers * dirs, "B", hidden]))
    return _model(nodes, inputs, outputs, inits, f"cellserve_{kind}")


def sru_steps_to_onnx(cell: SRUCell, steps: int) -> onnx.ModelProto:
    """k steps of one SRU cell, unrolled: one MatMul for the k input projections, then the element-wise
    recurrence per step. Inputs X [k, B, in], c0 [B, H]; outputs Y [k, B, H], cN [B, H]."""
    hidden, in_size = cell.hidden_size, cell.input_size
    blocks = cell.w.out_features // hidden
    inits = [numpy_helper.from_array(np.ascontiguousarray(cell.w.weight.T), "Wt")]
    for name in ("v_f", "v_r", "b_f", "b_r"):
        inits.append(numpy_helper.from_array(getattr(cell, name), name))
    inits.append(numpy_helper.from_array(np.array([1.0], dtype=np.float32), "one"))
    nodes = [helper.make_node("MatMul", ["X", "Wt"], ["U"]),
             helper.make_node("Split", ["U"], [f"U{i}" for i in range(steps)], axis=0, num_outputs=steps),
             helper.make_node("Split", ["X"], [f"X{i}" for i in range(steps)], axis=0, num_outputs=steps)]
    c, ys = "c0", []
    for t in range(steps):
        p = f"s{t}_"
        parts = [p + n for n in ("xt", "fp", "rp", "hw")[:blocks]]
        nodes += [helper.make_node("Squeeze", [f"U{t}", "axis0"], [p + "u"]),
                  helper.make_node("Squeeze", [f"X{t}", "axis0"], [p + "x"]),
                  helper.make_node("Split", [p + "u"], parts, axis=1, num_outputs=blocks)]
        highway = p + "hw" if blocks == 4 else p + "x"
        for gate, pre, v, b in (("f", "fp", "v_f", "b_f"), ("r", "rp", "v_r", "b_r")):
            nodes += [helper.make_node("Mul", [v, c], [p + gate + "vc"]),
                      helper.make_node("Add", [p + pre, p + gate + "vc"], [p + gate + "a"]),
                      helper.make_node("Add", [p + gate + "a", b], [p + gate + "b"]),
                      helper.make_node("Sigmoid", [p + gate + "b"], [p + gate])]
        nodes += [helper.make_node("Sub", ["one", p + "f"], [p + "1f"]),
                  helper.make_node("Mul", [p + "f", c], [p + "fc"]),
                  helper.make_node("Mul", [p + "1f", p + "xt"], [p + "fx"]),
                  helper.make_node("Add", [p + "fc", p + "fx"], [p + "c"]),
                  helper.make_node("Tanh" if cell.activation == "tanh" else "Identity", [p + "c"], [p + "g"]),
                  helper.make_node("Mul", [p + "r", p + "g"], [p + "rg"]),
                  helper.make_node("Sub", ["one", p + "r"], [p + "1r"]),
                  helper.make_node("Mul", [p + "1r", highway], [p + "rx"]),
                  helper.make_node("Add", [p + "rg", p + "rx"], [p + "h"]),
                  helper.make_node("Unsqueeze", [p + "h", "axis0"], [p + "h3"])]
        c = p + "c"
        ys.append(p + "h3")
    inits.append(numpy_helper.from_array(np.array([0], dtype=np.int64), "axis0"))
    nodes += [helper.make_node("Concat", ys, ["Y"], axis=0), helper.make_node("Identity", [c], ["cN"])]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [steps, "B", in_size]),
              helper.make_tensor_value_info("c0", TensorProto.FLOAT, ["B", hidden])]
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [steps, "B", hidden]),
               helper.make_tensor_value_info("cN", TensorProto.FLOAT, ["B", hidden])]
    return _model(nodes, inputs, outputs, inits, "cellserve_sru")


def matmul_to_onnx(weight: np.ndarray) -> onnx.ModelProto:
    """y = x @ weight.T as one MatMul with the weight as an initializer (which ONNX Runtime prepacks)."""
    n, k = weight.shape
    return _model([helper.make_node("MatMul", ["x", "wt"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
                  [numpy_helper.from_array(np.ascontiguousarray(weight.T, dtype=np.float32), "wt")], "matmul")


def ort_session(model: onnx.ModelProto, threads: int = 1):
    """An ONNX Runtime CPU session with a fixed number of intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _inverse_reorder(a: np.ndarray, kind: str) -> np.ndarray:
    blocks = np.split(a, len(_ORDER[kind]), axis=0)
    inverse = np.argsort(_ORDER[kind])
    return np.concatenate([blocks[i] for i in inverse], axis=0)


def load_onnx(source) -> onnx.ModelProto:
    """A ModelProto from a path, bytes or a ModelProto."""
    if isinstance(source, onnx.ModelProto):
        return source
    return onnx.load_from_string(source) if isinstance(source, bytes) else onnx.load(str(source))


def constants_of(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Tensors known before run time: initializers and the outputs of Constant nodes."""
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def cells_of_node(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> list[Cell]:
    """Our cells (one per direction) for an ONNX LSTM or GRU operator. Activations must be the defaults,
    GRU needs linear_before_reset=1 (torch's and cuDNN's GRU), and the weights must be constants."""
    kind = node.op_type.lower()
    where = f"{node.op_type} node {node.name!r}"
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    for unsupported in ("activations", "clip", "input_forget"):
        if attrs.get(unsupported):
            raise ValueError(f"{where}: {unsupported} is not supported")
    if kind == "gru" and attrs.get("linear_before_reset", 0) != 1:
        raise ValueError(f"{where}: GRU needs linear_before_reset=1 (the torch/cuDNN formulation)")
    if attrs.get("layout", 0) != 0:
        raise ValueError(f"{where}: only layout=0 ([T, B, F]) is supported")
    if attrs.get("direction", b"forward") in (b"reverse", "reverse"):
        raise ValueError(f"{where}: a lone reverse-direction layer is not supported")
    names = list(node.input) + [""] * (4 - len(node.input))
    if names[1] not in constants or names[2] not in constants:
        raise ValueError(f"{where}: its weights W and R must be constants (initializers)")
    w, r = constants[names[1]], constants[names[2]]
    hidden, gates = r.shape[-1], len(_ORDER[kind])
    b = constants.get(names[3]) if names[3] else None
    if names[3] and b is None:
        raise ValueError(f"{where}: its bias B must be a constant (initializer)")
    if b is None:
        b = np.zeros((w.shape[0], 2 * gates * hidden), np.float32)
    cells = []
    for d in range(w.shape[0]):
        w_ih, w_hh = _inverse_reorder(w[d], kind), _inverse_reorder(r[d], kind)
        b_ih, b_hh = _inverse_reorder(b[d, :gates * hidden], kind), _inverse_reorder(b[d, gates * hidden:], kind)
        if kind == "lstm":
            cells.append(LSTMCell(w_ih, w_hh, b_ih + b_hh))
        else:
            cells.append(GRUCell(w_ih, w_hh, b_ih, b_hh))
    return cells


def rnn_from_onnx(source) -> RNN:
    """Import the LSTM/GRU operators of an ONNX model (a path, bytes or ModelProto), in graph order, as a
    stacked RNN: consecutive operators are consecutive layers (models/imported.py imports whole graphs)."""
    model = load_onnx(source)
    constants = constants_of(model.graph)
    layers = [cells_of_node(node, constants) for node in model.graph.node if node.op_type in ("LSTM", "GRU")]
    if not layers:
        raise ValueError("no LSTM or GRU operator in the ONNX graph")
    return RNN(layers)


def quantize_onnx_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX Runtime's dynamic int8 quantization of the LSTM/GRU operators (per-channel weights; at run
    time DynamicQuantizeLSTM quantizes activations per call and uses its VNNI/AVX2 int8 GEMM)."""
    import tempfile
    from pathlib import Path

    from onnxruntime.quantization import QuantType, quantize_dynamic

    import logging

    root = logging.getLogger()
    level = root.level
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(model, source)
        root.setLevel(logging.ERROR)  # its advice to run shape-inference pre-processing is for CNN graphs
        try:
            quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["LSTM", "GRU"])
        finally:
            root.setLevel(level)
        return onnx.load(target)


class OnnxRuntimeCell(Cell):
    """An LSTM/GRU cell executed by ONNX Runtime, with our cell interface, so the engine and models run on
    either backend unchanged (per-model `backend: onnxruntime` or `onnxruntime-int8`)."""

    def __init__(self, cell: Cell, threads: int = 1, int8: bool = False):
        self.cell, self.kind, self.int8 = cell, cell.kind, int8
        self.input_size, self.hidden_size = cell.input_size, cell.hidden_size
        graph = rnn_to_onnx(RNN([[cell]]))
        if int8:
            graph = quantize_onnx_int8(graph)
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


def use_onnxruntime(model, threads: int = 1, int8: bool = False):
    """Switch every LSTM/GRU layer inside a model (RNN, LM, classifier, seq2seq, OCR) to ONNX Runtime, in
    place; int8 uses ORT's dynamically quantized operators."""
    rnns = rnns_of(model)
    if not rnns or any(r.cell_kind not in _ORDER for r in rnns):
        raise ValueError("the onnxruntime backend runs LSTM and GRU models")
    for rnn in rnns:
        if any(not hasattr(c.ih, "weight") or not hasattr(c.hh, "weight") for c in rnn.cells):
            raise ValueError("ONNX Runtime takes fp32 weights; quantize with backend onnxruntime-int8 instead")
        rnn.layers = [[OnnxRuntimeCell(c, threads, int8) for c in dirs] for dirs in rnn.layers]
    return model
