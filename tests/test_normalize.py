"""Graph normalization on small torch-made graphs, one transformation each: LSTM and GRU cells written in
primitive operators (torch's nn.LSTMCell / nn.GRUCell exports), a packed state tensor, an If on a control
input, weights from Constant nodes. Each imported graph must equal ONNX Runtime on the original, with the
state threaded through several calls, and serve sessions that hold the state themselves."""

import io

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from cellserve.cells.onnxruntime import ort_session  # noqa: E402
from cellserve.interop.normalize import normalize  # noqa: E402
from cellserve.interop.onnx_import import import_onnx  # noqa: E402
from cellserve.server.config import ModelConfig  # noqa: E402
from cellserve.server.repository import serve_model  # noqa: E402

IN, HIDDEN, STEPS = 6, 10, 7


class LSTMCellNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.cell, self.out = torch.nn.LSTMCell(IN, HIDDEN), torch.nn.Linear(HIDDEN, 3)

    def forward(self, x, h, c):
        h2, c2 = self.cell(torch.relu(x), (h, c))
        return self.out(h2), h2, c2


class GRUCellNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.cell, self.out = torch.nn.GRUCell(IN, HIDDEN), torch.nn.Linear(HIDDEN, 3)

    def forward(self, x, h):
        h2 = self.cell(x * 2.0, h)
        return self.out(h2), h2


class PackedStateNet(torch.nn.Module):
    """Silero's shape: one state tensor [2, B, H] holding h and c, a new one out."""

    def __init__(self):
        super().__init__()
        self.cell, self.out = torch.nn.LSTMCell(IN, HIDDEN), torch.nn.Linear(HIDDEN, 1)

    def forward(self, x, state):
        h, c = self.cell(x, (state[0], state[1]))
        return torch.sigmoid(self.out(h)), torch.stack([h, c])


def export(module, args, inputs, outputs) -> onnx.ModelProto:
    torch.manual_seed(0)
    module = module.eval()
    for p in module.parameters():
        torch.nn.init.uniform_(p, -0.5, 0.5)
    buffer = io.BytesIO()
    axes = {n: {0: "batch"} for n in inputs + outputs}
    if "state" in inputs:
        axes["state"] = axes["stateN"] = {1: "batch"}
    torch.onnx.export(module, args, buffer, input_names=inputs, output_names=outputs, dynamic_axes=axes,
                      dynamo=False, opset_version=17)
    return onnx.load_from_string(buffer.getvalue())


def thread(graph: onnx.ModelProto, model, states: dict, steps: int = STEPS, extra=None, batch: int = 3):
    """Run ORT on the original and our import side by side for `steps` calls, each feeding the state
    outputs back as the next call's state inputs; the outputs must agree every step."""
    session = ort_session(graph)
    names = [o.name for o in graph.graph.output]
    rng = np.random.default_rng(1)
    ours, theirs = dict(states), dict(states)
    pairs = {p["input"]: p["output"] for p in model.state_pairs}
    for _ in range(steps):
        x = rng.standard_normal((batch, IN)).astype(np.float32)
        want = dict(zip(names, session.run(None, {"x": x, **theirs, **(extra or {})})))
        got = model.forward({"x": x, **ours})
        for name in names:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5)
        ours = {k: got[v] for k, v in pairs.items()}
        theirs = {k: want[v] for k, v in pairs.items()}


def lstm_cell_graph():
    return export(LSTMCellNet(), (torch.randn(2, IN), torch.randn(2, HIDDEN), torch.randn(2, HIDDEN)),
                  ["x", "h", "c"], ["y", "hn", "cn"])


def test_an_lstm_cell_in_primitive_operators_becomes_an_lstm_operator():
    graph = lstm_cell_graph()
    assert "LSTM" not in {n.op_type for n in graph.graph.node}
    assert [n.op_type for n in normalize(graph).graph.node].count("LSTM") == 1
    model = import_onnx(graph)
    assert {(p["input"], p["output"]) for p in model.state_pairs} == {("h", "hn"), ("c", "cn")}
    zero = np.zeros((3, HIDDEN), np.float32)
    thread(graph, model, {"h": zero, "c": zero})


def test_a_gru_cell_in_primitive_operators_becomes_a_gru_operator():
    graph = export(GRUCellNet(), (torch.randn(2, IN), torch.randn(2, HIDDEN)), ["x", "h"], ["y", "hn"])
    assert [n.op_type for n in normalize(graph).graph.node].count("GRU") == 1
    model = import_onnx(graph)
    assert [(p["input"], p["output"]) for p in model.state_pairs] == [("h", "hn")]
    thread(graph, model, {"h": np.zeros((3, HIDDEN), np.float32)})


def test_a_packed_state_is_paired_and_held_by_the_server_in_sessions():
    graph = export(PackedStateNet(), (torch.randn(2, IN), torch.zeros(2, 2, HIDDEN)), ["x", "state"],
                   ["prob", "stateN"])
    model = import_onnx(graph)
    assert model.state_pairs == [{"input": "state", "output": "stateN"}]
    thread(graph, model, {"state": np.zeros((2, 3, HIDDEN), np.float32)})
    served = serve_model("packed", model, ModelConfig())
    assert served.stateful and next(s for s in served.inputs if s.name == "state").optional
    served.engine.start()
    try:  # a session: only x is sent; the state starts from zeros and stays on the server
        session = ort_session(graph)
        state = np.zeros((2, 1, HIDDEN), np.float32)
        rng = np.random.default_rng(2)
        for k in range(STEPS):
            x = rng.standard_normal((1, IN)).astype(np.float32)
            result = served.engine.submit({"x": x}, sequence_id="s", sequence_start=k == 0).result(30)
            want, state = session.run(None, {"x": x, "state": state})
            assert "stateN" not in result
            np.testing.assert_allclose(result["prob"], want, rtol=1e-4, atol=1e-5)
    finally:
        served.engine.stop()


def test_an_if_on_a_control_input_is_specialized_per_value_and_refused_unfixed():
    """x is scaled by 2 when sr == 16000, by 3 otherwise, before the LSTM cell."""
    graph = lstm_cell_graph()
    g = graph.graph
    g.input.append(helper.make_tensor_value_info("sr", TensorProto.INT64, []))
    g.initializer.append(numpy_helper.from_array(np.array(16000, np.int64), "sr16k"))
    branches = [helper.make_graph([helper.make_node("Mul", ["x", f"k{k}"], [f"xs{k}"])], f"b{k}", [],
                                  [helper.make_tensor_value_info(f"xs{k}", TensorProto.FLOAT, None)],
                                  initializer=[numpy_helper.from_array(np.array(float(k), np.float32), f"k{k}")])
                for k in (2, 3)]
    head = [helper.make_node("Equal", ["sr", "sr16k"], ["is16k"]),
            helper.make_node("If", ["is16k"], ["xs"], then_branch=branches[0], else_branch=branches[1], name="by_sr")]
    for node in g.node:
        node.input[:] = ["xs" if i == "x" else i for i in node.input]
    nodes = head + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    onnx.checker.check_model(graph)
    zero = np.zeros((3, HIDDEN), np.float32)
    for sr in (16000, 8000):
        model = import_onnx(graph, controls={"sr": sr})
        assert "sr" not in {i["name"] for i in model.inputs}
        thread(graph, model, {"h": zero, "c": zero}, extra={"sr": np.array(sr, np.int64)})
    with pytest.raises(ValueError, match="by_sr.*sr"):
        import_onnx(graph)


def test_weights_from_constant_nodes_are_folded():
    """The cell's weights come from Constant nodes through Transpose (as some converters emit them)."""
    graph = lstm_cell_graph()
    g = graph.graph
    weights = {n.input[1] for n in g.node if n.op_type == "Gemm"}
    moved = [i for i in g.initializer if i.name in weights]
    kept = [i for i in g.initializer if i.name not in weights]
    del g.initializer[:]
    g.initializer.extend(kept)
    nodes = []
    for init in moved:
        weight = numpy_helper.to_array(init)
        nodes += [helper.make_node("Constant", [], [init.name + "_t"],
                                   value=numpy_helper.from_array(np.ascontiguousarray(weight.T))),
                  helper.make_node("Transpose", [init.name + "_t"], [init.name], perm=[1, 0])]
    nodes += list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    onnx.checker.check_model(graph)
    assert "Constant" in {n.op_type for n in graph.graph.node}
    zero = np.zeros((3, HIDDEN), np.float32)
    thread(graph, import_onnx(graph), {"h": zero, "c": zero})


class Gained(torch.nn.Module):
    """A module whose forward takes a non-tensor argument."""

    def __init__(self):
        super().__init__()
        self.rnn, self.out = torch.nn.GRU(IN, HIDDEN), torch.nn.Linear(HIDDEN, 2)

    def forward(self, x, gain: float):
        y, _ = self.rnn(x * gain)
        return self.out(y)


@pytest.mark.parametrize("script", [True, False], ids=["torchscript", "module"])
def test_a_non_tensor_argument_is_bound_for_the_export(script):
    from cellserve.interop.torch_import import module_to_onnx, parse_arg

    torch.manual_seed(0)
    module = Gained().eval()
    module = torch.jit.script(module) if script else module
    assert parse_arg("gain=2.5") == ("gain", 2.5) and parse_arg("sr=16000") == ("sr", 16000)
    graph = module_to_onnx(module, [("x", "float32", ["time", "batch", IN])], dict([parse_arg("gain=2.5")]))
    model = import_onnx(graph)
    x = torch.randn(5, 3, IN)
    with torch.no_grad():
        want = module(x, 2.5).numpy()
    np.testing.assert_allclose(model.forward({"x": x.numpy()})["output"], want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="does not take"):
        module_to_onnx(module, [("x", "float32", ["time", "batch", IN])], {"volume": 1.0})


@pytest.mark.parametrize("channels,out,kernel,stride,pads,length,bias", [
    (1, 258, 256, 128, (0, 0), 640, False),  # Silero's STFT: frames of 2 stride-wide blocks
    (129, 128, 3, 1, (1, 1), 4, True),  # its first encoder conv
    (128, 64, 3, 2, (1, 1), 4, True),  # strided
    (5, 7, 4, 3, (2, 0), 23, True),  # a stride that does not divide the kernel, a length no tile divides
    (3, 2, 1, 1, (0, 0), 9, False),  # a pointwise conv: one Slice
])
def test_a_1d_conv_becomes_columns_times_weights_and_equals_onnxruntime(channels, out, kernel, stride, pads, length,
                                                                        bias):
    from cellserve.interop.normalize import convs_to_matmuls

    rng = np.random.default_rng(kernel + length)
    inits = [numpy_helper.from_array(rng.standard_normal((out, channels, kernel)).astype(np.float32), "w")]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(out).astype(np.float32), "b"))
    conv = helper.make_node("Conv", ["x", "w", "b"] if bias else ["x", "w"], ["y"], strides=[stride], pads=list(pads))
    graph = helper.make_graph([conv, helper.make_node("Relu", ["y"], ["z"])], "conv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", channels, length])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    rewritten = onnx.ModelProto.FromString(model.SerializeToString())
    assert convs_to_matmuls(rewritten) == 1 and not any(n.op_type == "Conv" for n in rewritten.graph.node)
    x = rng.standard_normal((5, channels, length)).astype(np.float32)
    want = ort_session(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(ort_session(rewritten).run(None, {"x": x})[0], want, rtol=1e-5, atol=1e-5)


def test_convs_that_do_not_fit_are_left_alone():
    from cellserve.interop.normalize import convs_to_matmuls

    w = numpy_helper.from_array(np.ones((4, 2, 3), np.float32), "w")
    for attrs, length in (({"dilations": [2]}, 9), ({"group": 2}, 9), ({}, None), ({"auto_pad": "SAME_UPPER"}, 9)):
        conv = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
        graph = helper.make_graph([conv], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                 ["batch", 2 * attrs.get("group", 1), length])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        assert convs_to_matmuls(model) == 0
