"""Export our recurrent models to ONNX, using the standard LSTM/GRU operators where they exist and
primitive operators (MatMul, Sigmoid, Tanh, ...) for SRU; and ONNX Runtime as the backend of a model's
LSTM/GRU layers (use_onnxruntime), fp32 or with its dynamic int8 quantization. Needs the `onnx` extra."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cellserve.cells import Cell, SRUCell
from cellserve.cells.onnxruntime import OnnxRuntimeCell
from cellserve.models.rnn import RNN, rnns_of

OPSET = 18
IR_VERSION = 8  # enough for opset 18; runtimes reject IR versions newer than they know
# Block orders: torch LSTM [i, f, g, o] -> ONNX [i, o, f, c]; torch GRU [r, z, n] -> ONNX [z, r, h].
GATE_ORDER = {"lstm": [0, 3, 1, 2], "gru": [1, 0, 2]}


def _reorder(a: np.ndarray, kind: str) -> np.ndarray:
    blocks = np.split(a, len(GATE_ORDER[kind]), axis=0)
    return np.concatenate([blocks[i] for i in GATE_ORDER[kind]], axis=0)


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
    if kind not in GATE_ORDER:
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


def quantize_onnx_int8(model: onnx.ModelProto, op_types=("LSTM", "GRU")) -> onnx.ModelProto:
    """ONNX Runtime's dynamic int8 quantization of the LSTM/GRU operators, or of the others named
    (per-channel weights; at run time DynamicQuantizeLSTM, or DynamicQuantizeLinear + MatMulInteger, quantize
    activations per call and use its VNNI/AVX2 int8 GEMM)."""
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
                             op_types_to_quantize=list(op_types))
        finally:
            root.setLevel(level)
        return onnx.load(target)


def _ort_cell(cell: Cell, threads: int, int8: bool) -> OnnxRuntimeCell:
    graph = rnn_to_onnx(RNN([[cell]]))
    return OnnxRuntimeCell(cell, quantize_onnx_int8(graph) if int8 else graph, threads, int8)


def use_onnxruntime(model, threads: int = 1, int8: bool = False):
    """Switch every LSTM/GRU layer inside a model (RNN, LM, classifier, seq2seq, OCR) to ONNX Runtime, in
    place; int8 uses ORT's dynamically quantized operators."""
    rnns = rnns_of(model)
    if not rnns or any(r.cell_kind not in GATE_ORDER for r in rnns):
        raise ValueError("the onnxruntime backend runs LSTM and GRU models")
    for rnn in rnns:
        if any(not hasattr(c.ih, "weight") or not hasattr(c.hh, "weight") for c in rnn.cells):
            raise ValueError("ONNX Runtime takes fp32 weights; quantize with backend onnxruntime-int8 instead")
        rnn.layers = [[_ort_cell(c, threads, int8) for c in dirs] for dirs in rnn.layers]
    return model
