"""Compression: integer kernels against exact integer math, QAT in torch against our integer runtime,
the OCR recognizer against torch, pruning and distillation mechanics, and OCR serving."""

import numpy as np
import pytest
import torch

from cellserve import models
from cellserve.cells import LSTMCell
from cellserve.tasks import ocr_train as ot
from cellserve.tasks.ocr_data import ALPHABET, HEIGHT, character_error_rate, decode, encode, make_datasets, render
from cellserve.compress.qat import QuantSpec, fake_weight, reverse_within
from cellserve.compress.quantize import quantize_dynamic
from cellserve.interop.torch_import import rnn_from_torch
from cellserve.kernels import Dense, QuantizedDense
from cellserve.kernels.quantized import pack, quantize_weight, unpack
from cellserve.families.decoding import ctc_greedy
from cellserve.families.ocr import recognize
from cellserve.models.ocr import columns


@pytest.mark.parametrize("bits", [4, 2, 1])
def test_pack_unpack_round_trip(bits):
    rng = np.random.default_rng(bits)
    levels = [-1, 1] if bits == 1 else list(range(-(2 ** (bits - 1) - 1), 2 ** (bits - 1)))
    q = rng.choice(levels, size=(13, 37)).astype(np.int8)
    packed = pack(q, bits)
    assert packed.nbytes == -(-q.size * bits // 8)
    np.testing.assert_array_equal(unpack(packed, bits, q.shape), q)


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_quantized_dense_is_exact_integer_math(bits, rows):
    """The kernel's output equals (x codes * x scale) @ (w codes * w scale).T in float64."""
    rng = np.random.default_rng(rows)
    w = rng.standard_normal((24, 70)).astype(np.float32)
    x = rng.standard_normal((rows, 70)).astype(np.float32)
    dense = QuantizedDense.from_float(w, bits)
    xq, xs = dense.quantize_input(x)
    expected = (xq.astype(np.float64) * xs[:, None]) @ (dense.int_codes().astype(np.float64) * dense.scale[:, None]).T
    np.testing.assert_allclose(dense(x), expected, rtol=1e-5, atol=1e-5)


def test_int8_error_is_within_the_rounding_bound():
    """|x W^T - x^ W^^T| <= 0.5 s_w sum|x| + 0.5 s_x sum|W^| per output (half a step per operand)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 128)).astype(np.float32)
    x = rng.standard_normal((5, 128)).astype(np.float32)
    dense = QuantizedDense.from_float(w, 8)
    _, xs = dense.quantize_input(x)
    bound = 0.5 * np.abs(x).sum(1)[:, None] * dense.scale[None] + 0.5 * xs[:, None] * np.abs(dense.dense_weight()).sum(1)[None]
    err = np.abs(dense(x) - x @ w.T)
    assert (err <= bound + 1e-4).all()
    assert err.max() < 0.02 * np.abs(x @ w.T).max()


def test_quantize_weight_grids():
    w = np.random.default_rng(1).standard_normal((8, 50)).astype(np.float32)
    for bits, levels in ((1, {-1, 1}), (2, {-1, 0, 1}), (4, set(range(-7, 8)))):
        q, scale = quantize_weight(w, bits)
        assert set(np.unique(q)) <= levels
        assert (scale > 0).all()
    torch_q = fake_weight(torch.from_numpy(w), 4).detach().numpy()
    q, scale = quantize_weight(w, 4)
    np.testing.assert_allclose(torch_q, q * scale[:, None], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("batch", [1, 5])
def test_fused_recurrence_matches_torch_lstm(batch):
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(12, 16)
    cell = rnn_from_torch(lstm).cells[0]
    x = torch.randn(9, batch, 12)
    expected, _ = lstm(x)
    hs, _ = cell.steps(x.numpy(), cell.zero_state(batch))
    np.testing.assert_allclose(hs, expected.detach().numpy(), rtol=1e-4, atol=1e-5)


def test_cell_state_stays_on_its_grid():
    rng = np.random.default_rng(0)
    base = LSTMCell.random(6, 8, rng)
    cell = LSTMCell(base.ih.weight * 4, base.hh.weight * 4, base.bias, cell_quant=(0.25, 1.0))
    state = cell.zero_state(2)
    for x in rng.standard_normal((20, 2, 6)).astype(np.float32):
        state = cell.step(x, state)
        c = state[1]
        assert np.abs(c).max() <= 1.0 + 1e-6
        np.testing.assert_allclose(c / 0.25, np.round(c / 0.25), atol=1e-4)


def small_recognizer(spec=None, hidden=16):
    module = ot.build(hidden, seed=3, spec=spec)
    return module.eval()


def frames_batch(lengths, stride=2, seed=0):
    rng = np.random.default_rng(seed)
    images = [rng.random((HEIGHT, stride * n), dtype=np.float32) for n in lengths]
    frames = [columns(img, stride) for img in images]
    padded = np.zeros((max(lengths), len(lengths), frames[0].shape[1]), np.float32)
    for b, f in enumerate(frames):
        padded[: len(f), b] = f
    return images, torch.from_numpy(padded), torch.tensor(lengths)


def test_ocr_runtime_matches_torch_on_padded_batches():
    module = small_recognizer()
    images, frames, lengths = frames_batch([11, 7])
    with torch.no_grad():
        logits = module(frames, lengths).numpy()
    model = ot.to_runtime(module)
    for b, image in enumerate(images):
        np.testing.assert_allclose(model.logits(image), logits[: lengths[b], b], rtol=1e-4, atol=1e-5)


def test_qat_forward_without_quantization_equals_nn_lstm():
    module = small_recognizer()
    _, frames, lengths = frames_batch([9, 5, 12])
    with torch.no_grad():
        expected = module(frames, lengths)
        module.spec = QuantSpec(8)
        from cellserve.compress.qat import quantized_lstm

        got = module.head(quantized_lstm(module.rnn, frames, lengths, None))
    inside = (torch.arange(frames.shape[0])[:, None] < lengths[None]).numpy()
    np.testing.assert_allclose(got.numpy()[inside], expected.numpy()[inside], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("weight_bits,act_bits", [(8, 8), (4, 4), (2, 8), (1, 4)])
def test_qat_model_converts_to_integer_kernels_without_drift(weight_bits, act_bits):
    """The fake-quantized torch forward and our integer runtime compute the same logits (up to rare
    rounding-tie and summation-order flips of one grid step)."""
    spec = QuantSpec(weight_bits, act_bits, cell_bits=8, cell_limit=2.0)
    module = small_recognizer(spec)
    images, frames, lengths = frames_batch([10, 14], seed=1)
    with torch.no_grad():
        logits = module(frames, lengths).numpy()
    model = ot.to_runtime(module)
    assert all(isinstance(c.hh, QuantizedDense) and c.hh.bits == weight_bits for c in model.rnn.cells)
    for b, image in enumerate(images):
        got = model.logits(image)
        close = np.isclose(got, logits[: lengths[b], b], rtol=1e-3, atol=1e-3)
        assert close.mean() > 0.97
        assert (got.argmax(-1) == logits[: lengths[b], b].argmax(-1)).mean() > 0.9


def test_reverse_within_keeps_padding_at_the_end():
    x = torch.arange(8.0).reshape(4, 2, 1)
    y = reverse_within(x, torch.tensor([4, 2]))
    assert y[:, 0, 0].tolist() == [6.0, 4.0, 2.0, 0.0]
    assert y[:, 1, 0].tolist() == [3.0, 1.0, 5.0, 7.0]


def test_ctc_greedy_collapses_repeats_then_drops_blanks():
    assert ctc_greedy(np.array([0, 3, 3, 0, 3, 5, 5, 0, 0])) == [3, 3, 5]
    assert ctc_greedy(np.array([0, 0])) == []


def test_character_error_rate_and_codec():
    assert character_error_rate(["abc"], ["abc"]) == 0
    assert character_error_rate(["abd", ""], ["abc", "xy"]) == pytest.approx(3 / 5)
    assert decode(encode("Hello, world!")) == "Hello, world!"
    assert min(encode(ALPHABET)) == 1  # 0 is the CTC blank


def test_rendered_lines_and_split():
    train, test = make_datasets(20, 10, seed=1)
    assert not set(train.texts) & set(test.texts)
    image = render("a line of text", np.random.default_rng(0))
    assert image.shape[0] == HEIGHT and image.dtype == np.float32 and 0 <= image.min() and image.max() <= 1


def test_structured_pruning_keeps_function_when_keeping_every_unit():
    module = small_recognizer()
    _, frames, lengths = frames_batch([8, 6])
    same = ot.prune_hidden_units(module, 16).eval()
    half = ot.prune_hidden_units(module, 8).eval()
    with torch.no_grad():
        np.testing.assert_allclose(same(frames, lengths).numpy(), module(frames, lengths).numpy(), rtol=1e-4, atol=1e-5)
        assert half(frames, lengths).shape == (8, 2, len(ALPHABET) + 1)
    assert ot.to_runtime(half).rnn.cells[0].hh.weight.shape == (32, 8)


def test_magnitude_masks_reach_the_sparsity():
    module = small_recognizer()
    masks = ot.magnitude_masks(module, 0.75)
    ot.apply_masks(module, masks)
    w = module.rnn.weight_hh_l0.detach()
    assert (w == 0).float().mean().item() == pytest.approx(0.75, abs=0.01)


def test_distillation_loss_is_zero_for_the_teacher_itself():
    module = small_recognizer()
    _, frames, lengths = frames_batch([8, 6])
    loss = ot.distillation_loss(module)
    with torch.no_grad():
        assert loss(frames, lengths, module(frames, lengths)).item() == pytest.approx(0.0, abs=1e-6)
        other = small_recognizer(hidden=8)
        assert loss(frames, lengths, other(frames, lengths)).item() > 0


def test_quantized_models_save_and_load(tmp_path):
    model = ot.to_runtime(small_recognizer(QuantSpec(2, 4, cell_limit=2.0)))
    ptq = quantize_dynamic(ot.to_runtime(small_recognizer()))
    image = frames_batch([12])[0][0]
    for m in (model, ptq):
        path = models.save(m, tmp_path / "m.safetensors")
        loaded = models.load(path)
        np.testing.assert_array_equal(loaded.logits(image), m.logits(image))
        assert loaded.weight_bytes == m.weight_bytes
    assert ptq.rnn.cells[0].hh.nbytes < Dense(ptq.rnn.cells[0].hh.dense_weight()).nbytes / 3


@pytest.mark.parametrize("policy", ["cellular", "graph", "none"])
def test_ocr_serving_equals_direct_recognition(policy):
    """Lines of different widths batched per cell step (or padded, or alone) give each line's unbatched result."""
    from cellserve.engine import Engine
    from cellserve.families import make_runner

    model = quantize_dynamic(ot.to_runtime(small_recognizer()))
    images = [np.random.default_rng(i).random((HEIGHT, w), dtype=np.float32) for i, w in enumerate((20, 34, 8, 50))]
    engine = Engine(make_runner(model, 16), policy, max_batch=8)
    engine.start()
    try:
        results = [engine.submit({"image": img}) for img in images]
        texts = [r.result(timeout=30)["text"] for r in results]
    finally:
        engine.stop()
    assert texts == [recognize(model, img) for img in images]
    with pytest.raises(ValueError, match="image must have shape"):
        make_runner(model, 4).prepare({"image": np.zeros((7, 20), np.float32)})


def test_compressed_ocr_model_served_over_http_from_a_repository(tmp_path):
    """A QAT model saved to a model folder loads and serves like any other model (KServe v2 JSON)."""
    from fastapi.testclient import TestClient

    from cellserve.server.app import create_app
    from cellserve.server.repository import Repository

    model = ot.to_runtime(small_recognizer(QuantSpec(4, 8, cell_limit=2.0)))
    (tmp_path / "ocr").mkdir()
    models.save(model, tmp_path / "ocr" / "model.safetensors")
    images = np.random.default_rng(5).random((2, HEIGHT, 24), dtype=np.float32)
    body = {"inputs": [{"name": "image", "shape": list(images.shape), "datatype": "FP32",
                        "data": images.reshape(-1).tolist()}]}
    with TestClient(create_app(Repository.from_directory(tmp_path))) as client:
        meta = client.get("/v2/models/ocr").json()
        assert meta["inputs"][0]["shape"] == [-1, HEIGHT, -1] and meta["parameters"]["architecture"] == "ocr"
        response = client.post("/v2/models/ocr/infer", json=body)
        assert response.status_code == 200, response.text
        (text,) = response.json()["outputs"]
        assert text["datatype"] == "BYTES" and text["data"] == [recognize(model, img) for img in images]
        body["inputs"][0]["shape"] = [2, 24, HEIGHT]
        bad = client.post("/v2/models/ocr/infer", json=body)
        assert bad.status_code == 400 and "image must have shape" in bad.json()["error"]
        assert client.post("/v2/models/ocr/infer", json=body | {"inputs": [body["inputs"][0] | {"shape": [2, HEIGHT, 24]}]}).status_code == 200


def compressed_variants():
    """One small recognizer in every compressed form our runtime runs."""
    module = small_recognizer()
    fp32 = ot.to_runtime(module)
    variants = {"int8": quantize_dynamic(fp32)}
    for bits in (4, 2, 1):
        spec = QuantSpec(bits, 8 if bits > 1 else 4, cell_bits=8, cell_limit=2.0)
        variants[f"w{bits}"] = ot.to_runtime(ot.with_spec(module, spec))
    blocks = small_recognizer()
    ot.apply_masks(blocks, ot.block_masks(blocks, 0.75))
    variants["blocks75"] = ot.to_runtime(blocks, block_sparse=True)
    return variants


def test_compressed_models_save_load_and_serve_over_http_and_grpc(tmp_path):
    """Quantized (int8, 4/2/1-bit) and block-sparse recognizers keep their kind through a file, compute the
    same logits after loading, and read the same text over HTTP and gRPC as in process."""
    import httpx
    import tritonclient.grpc as grpcclient

    from cellserve import models
    from cellserve.kernels import BlockSparseDense
    from cellserve.server.app import create_app
    from cellserve.server.background import BackgroundServer
    from cellserve.server.repository import Repository, load_folder

    images, _, _ = frames_batch([9, 13, 6], seed=4)
    variants = compressed_variants()
    served = []
    for name, model in variants.items():
        (tmp_path / name).mkdir()
        models.save(model, tmp_path / name / "model.safetensors")
        loaded = models.load(tmp_path / name / "model.safetensors")
        kinds = lambda m: [(type(c.ih).__name__, type(c.hh).__name__, getattr(c.hh, "bits", 32))  # noqa: E731
                           for c in m.rnn.cells] + [type(m.head.w).__name__]
        assert kinds(loaded) == kinds(model)
        for image in images:
            np.testing.assert_array_equal(loaded.logits(image), model.logits(image))
        served.append(load_folder(tmp_path / name))
    assert isinstance(variants["blocks75"].rnn.cells[0].hh, BlockSparseDense)
    assert all(isinstance(variants[f"w{b}"].rnn.cells[0].hh, QuantizedDense) for b in (4, 2, 1))

    app = create_app(Repository(served, root=tmp_path), grpc_port=0)
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url) as http:
        grpc = grpcclient.InferenceServerClient(url=f"127.0.0.1:{app.state.grpc_port}")
        try:
            for name, model in variants.items():
                for image in images:
                    expected = recognize(model, image)
                    body = {"inputs": [{"name": "image", "shape": list(image.shape), "datatype": "FP32",
                                        "data": image.reshape(-1).tolist()}]}
                    reply = http.post(f"/v2/models/{name}/infer", json=body)
                    assert reply.status_code == 200, reply.text
                    assert reply.json()["outputs"][0]["data"] == [expected]
                    inp = grpcclient.InferInput("image", list(image.shape), "FP32")
                    inp.set_data_from_numpy(image)
                    result = grpc.infer(name, [inp])
                    assert result.as_numpy("text")[0].decode() == expected
        finally:
            grpc.close()
