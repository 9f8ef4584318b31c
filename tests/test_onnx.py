"""ONNX export and import against ONNX Runtime, and the onnxruntime backend behind the same engine."""

import numpy as np
import pytest

from cellserve.cells import SRUCell
from cellserve.engine import Engine
from cellserve.families import make_runner
from cellserve.models import LanguageModel, RNN
from cellserve.cells.onnxruntime import ort_session
from cellserve.interop.onnx_export import rnn_to_onnx, sru_steps_to_onnx, use_onnxruntime
from cellserve.interop.onnx_import import rnn_from_onnx
from cellserve.server.repository import ModelConfig, serve_model


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_export_matches_onnxruntime_and_imports_back(kind, bidirectional, rng):
    rnn = RNN.random(kind, 5, 7, num_layers=2, bidirectional=bidirectional, seed=3)
    proto = rnn_to_onnx(rnn)
    xs = rng.standard_normal((6, 3, 5)).astype(np.float32)
    h0 = rng.standard_normal((2 * rnn.num_directions, 3, 7)).astype(np.float32)
    state = [(h0[i], np.zeros_like(h0[i])) if kind == "lstm" else (h0[i],) for i in range(len(h0))]
    feeds = {"X": xs, "h0": h0}
    if kind == "lstm":
        feeds["c0"] = np.zeros_like(h0)
    ort_y, ort_h = ort_session(proto).run(None, feeds)[:2]
    ys, finals = rnn.forward(xs, state)
    np.testing.assert_allclose(ort_y, ys, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ort_h, np.stack([s[0] for s in finals]), rtol=1e-4, atol=1e-5)
    back = rnn_from_onnx(proto.SerializeToString())
    assert back.config() == rnn.config()
    for name, value in rnn.tensors().items():
        np.testing.assert_allclose(back.tensors()[name], value, rtol=1e-6, atol=1e-7)


def test_sru_block_export_matches(rng):
    cell = SRUCell.random(8, 8, 0)
    xs = rng.standard_normal((5, 2, 8)).astype(np.float32)
    ys, state = cell.steps(xs, cell.zero_state(2))
    y, c = ort_session(sru_steps_to_onnx(cell, 5)).run(None, {"X": xs, "c0": np.zeros((2, 8), np.float32)})
    np.testing.assert_allclose(y, ys, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(c, state[1], rtol=1e-4, atol=1e-5)


def test_import_rejects_what_it_cannot_represent():
    rnn = RNN.random("gru", 3, 4, seed=0)
    proto = rnn_to_onnx(rnn)
    for node in proto.graph.node:
        if node.op_type == "GRU":
            for attr in node.attribute:
                if attr.name == "linear_before_reset":
                    attr.i = 0
    with pytest.raises(ValueError, match="linear_before_reset"):
        rnn_from_onnx(proto)


def test_onnxruntime_backend_serves_the_same_results(rng):
    lm = LanguageModel.random(40, 8, 12, num_layers=2, seed=1)
    reference = LanguageModel.random(40, 8, 12, num_layers=2, seed=1)
    served = serve_model("lm", lm, ModelConfig(backend="onnxruntime"))
    served.engine.start()
    requests = [{"tokens": rng.integers(0, 40, int(rng.integers(2, 15)))} for _ in range(12)]
    futures = [served.engine.submit(r) for r in requests]
    ours = Engine(make_runner(reference, 64)).start()
    for req, f in zip(requests, futures):
        got, want = f.result(timeout=30), ours.submit(req).result(timeout=30)
        assert got["log_likelihood"] == pytest.approx(want["log_likelihood"], rel=1e-4)
        assert got["next_token"] == want["next_token"]
    served.engine.stop()
    ours.stop()
    with pytest.raises(ValueError, match="LSTM and GRU"):
        use_onnxruntime(RNN.random("sru", 4, 4))


def test_onnxruntime_int8_backend_is_close_and_smaller(rng):
    """ORT's dynamic int8 LSTM: outputs near fp32 (int8 rounding), weights about a quarter."""
    rnn = RNN.random("lstm", 16, 32, num_layers=1, bidirectional=True, seed=2)
    reference = RNN.random("lstm", 16, 32, num_layers=1, bidirectional=True, seed=2)
    xs = rng.standard_normal((20, 1, 16)).astype(np.float32)
    use_onnxruntime(rnn, int8=True)
    got, want = rnn.forward(xs)[0], reference.forward(xs)[0]
    assert np.abs(got - want).max() < 0.05
    assert not np.allclose(got, want, atol=1e-6)  # it really is quantized
    assert rnn.weight_bytes < 0.4 * reference.weight_bytes


def test_onnxruntime_refuses_already_quantized_models():
    from cellserve.compress.quantize import quantize_dynamic

    with pytest.raises(ValueError, match="fp32 weights"):
        use_onnxruntime(quantize_dynamic(LanguageModel.random(40, 8, 12, seed=1)))
