"""bf16 weights: the product against numpy on the same bf16-rounded inputs with exact accumulation (rtol
1e-5, as fp32 products), on every ISA path this CPU has (vdpbf16ps where AVX512-BF16 is there, widened
fp32 FMAs elsewhere); the cells on bf16 weights; and whole models turned bf16 against their fp32 selves."""

import numpy as np
import pytest

from cellserve import kernels
from cellserve.compress.quantize import bf16_weights
from cellserve.kernels import Bf16Dense, Dense, _native, load_dense
from cellserve.kernels.recurrence import lstm_sequence, lstm_step, qrnn_steps, sru_steps

from test_kernels import SHAPES, close, isa, sigmoid  # noqa: F401 (isa: the per-path fixture)


def bf16(x) -> np.ndarray:
    """x rounded to the nearest even bf16, as fp32 (numpy's own reference for the kernels' rounding)."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)


def product(x, w) -> np.ndarray:
    return bf16(x).astype(np.float64) @ bf16(w).astype(np.float64).T


@pytest.mark.parametrize("m,k,n", SHAPES + [(12, 64, 32), (24, 2, 64), (40, 1024, 33)])
def test_bf16_product_matches_numpy_on_rounded_inputs(isa, m, k, n, rng):
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    close(Bf16Dense(w)(x), product(x, w))


def test_rounding_is_to_nearest_even(isa):
    """Ties go to the even bf16, on the weights (at packing) and on the activations (per product)."""
    base = np.float32(1.0).view(np.uint32)
    ties = np.array([base | 0x8000, base | 0x18000, base | 0x7FFF, base | 0x8001], np.uint32).view(np.float32)
    dense = Bf16Dense(ties.reshape(4, 1))
    np.testing.assert_array_equal(dense.weight.ravel().view(np.uint32) >> 16,
                                  [0x3F80, 0x3F82, 0x3F80, 0x3F81])
    out = Bf16Dense(np.ones((1, 4), np.float32))(ties.reshape(1, 4))
    assert out[0, 0] == np.float32(bf16(ties).astype(np.float64).sum())


def test_a_nan_activation_gives_nan_in_its_row_only(isa, rng):
    w = rng.standard_normal((40, 300)).astype(np.float32)
    x = rng.standard_normal((20, 300)).astype(np.float32)
    x[7, 123] = np.nan
    out = Bf16Dense(w)(x)
    assert np.isnan(out[7]).all()
    keep = np.arange(20) != 7
    close(out[keep], product(x[keep], w))


def test_the_default_path_takes_the_faster_bf16_product_for_the_cpu():
    """vdpbf16ps issues at half the FMA rate on Intel's cores and at the full rate on AMD's Zen 4, so an Intel
    CPU with AVX512-BF16 defaults to a path whose bf16 product runs on FMAs or, where AMX is granted, on tiles
    (platform.cpp: avx512-amx comes first), an AMD one to the best path it has."""
    if not any("bf16" in path for path in kernels.isas()):
        pytest.skip("this CPU has no AVX512-BF16")
    vendor = next(line.split(":")[1].strip() for line in open("/proc/cpuinfo") if line.startswith("vendor_id"))
    if vendor == "GenuineIntel":
        assert "bf16" not in kernels.isa()
        assert kernels.isa() == next(path for path in kernels.isas() if "bf16" not in path)
    else:
        assert kernels.isa() == kernels.isas()[0]


def test_addend_bias_and_strided_rows(isa, rng):
    w = rng.standard_normal((40, 23)).astype(np.float32)
    big = rng.standard_normal((11, 50)).astype(np.float32)
    x = big[:, 3:26]
    bias = rng.standard_normal(40).astype(np.float32)
    out = rng.standard_normal((11, 40)).astype(np.float32)
    expected = out.astype(np.float64) + product(x, w) + bias
    _native.gemm(x, Bf16Dense(w).packed, out, out, bias)
    close(out, expected)


def test_bf16_matrix_holds_half_the_bytes_and_round_trips_through_its_tensors(rng):
    w = rng.standard_normal((70, 33)).astype(np.float32)
    dense = Bf16Dense(w)
    assert dense.nbytes == 70 * 33 * 2 and dense.packed.kind == "bf16" and dense.packed.bits == 16
    kpad = 64 if "avx512-amx" in kernels.isas() else 34  # K padded to even, or to AMX's 32 bf16 per tile row
    assert dense.packed.nbytes == 3 * kpad * 32 * 2  # 3 panels of 32 columns
    np.testing.assert_array_equal(dense.weight, bf16(w))
    again = load_dense("w", dense.tensors("w"))
    assert isinstance(again, Bf16Dense)
    np.testing.assert_array_equal(again.weight, dense.weight)


def test_lstm_step_and_sequence_on_bf16_weights(isa, rng):
    """Gates = bf16(x) W_ih^T + bf16(h) W_hh^T + bias, accumulated in fp32; the gate math and c stay fp32."""
    batch, inputs, hidden = 5, 19, 24
    w_ih = rng.standard_normal((4 * hidden, inputs)).astype(np.float32) * 0.3
    w_hh = rng.standard_normal((4 * hidden, hidden)).astype(np.float32) * 0.3
    bias = rng.standard_normal(4 * hidden).astype(np.float32)
    x = rng.standard_normal((batch, inputs)).astype(np.float32)
    h = rng.standard_normal((batch, hidden)).astype(np.float32)
    c = rng.standard_normal((batch, hidden)).astype(np.float32)

    def reference(x, h, c, gi=None):
        g = (product(x, w_ih) if gi is None else gi) + product(h, w_hh) + bias
        i, f, gg, o = (g[:, j * hidden:(j + 1) * hidden] for j in range(4))
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(gg)
        return sigmoid(o) * np.tanh(c), c

    h1, c1 = lstm_step(Bf16Dense(w_ih), Bf16Dense(w_hh), bias, x, h, c)
    want_h, want_c = reference(x, h, c)
    close(h1, want_h, rtol=1e-5)
    close(c1, want_c, rtol=1e-5)

    steps = 4
    gi = rng.standard_normal((steps, batch, 4 * hidden)).astype(np.float32)
    cs, hs = c.copy(), np.empty((steps, batch, hidden), np.float32)
    lstm_sequence(Bf16Dense(w_hh), gi, bias, h, cs, hs)
    ref_h, ref_c = h, c.astype(np.float64)
    for t in range(steps):
        ref_h, ref_c = reference(None, ref_h.astype(np.float32), ref_c, gi=gi[t].astype(np.float64))
        close(hs[t], ref_h, rtol=1e-4)


def test_sru_and_qrnn_blocks_on_bf16_weights(isa, rng):
    """k steps after one bf16 product equal the fp32 kernels on the bf16-rounded weights (inputs that are
    bf16 already, since the SRU's highway reads x itself, unrounded)."""
    hidden, steps, batch = 16, 6, 3
    w = rng.standard_normal((3 * hidden, hidden)).astype(np.float32) * 0.3
    v_f, v_r, b_f, b_r = (rng.standard_normal(hidden).astype(np.float32) for _ in range(4))
    xs = bf16(rng.standard_normal((steps, batch, hidden)))
    c0 = rng.standard_normal((batch, hidden)).astype(np.float32)
    outs = []
    for dense in (Bf16Dense(w), Dense(bf16(w))):
        c, hs = c0.copy(), np.empty((steps, batch, hidden), np.float32)
        sru_steps(dense, xs, v_f, v_r, b_f, b_r, c, hs, True)
        outs.append((hs, c))
    close(outs[0][0], outs[1][0])
    close(outs[0][1], outs[1][1])
    wq = rng.standard_normal((3 * hidden, 2 * hidden)).astype(np.float32) * 0.3
    bias = rng.standard_normal(3 * hidden).astype(np.float32)
    window = bf16(rng.standard_normal((steps, batch, 2 * hidden)))
    outs = []
    for dense in (Bf16Dense(wq), Dense(bf16(wq))):
        c, hs = c0.copy(), np.empty((steps, batch, hidden), np.float32)
        qrnn_steps(dense, window, bias, c, hs)
        outs.append(hs)
    close(outs[0], outs[1])


def test_bf16_speller_gives_the_fp32_spellings():
    """The embedded speller with every matrix bf16: the same words as fp32 on 300 numbers, and decoder
    log-probabilities within 0.05 of fp32's."""
    from cellserve.tasks.speller import MAX_NUMBER, decode_words, encode_number, load_default

    fp32 = load_default()
    half = bf16_weights(fp32)
    for a, b in ((half.encoder, fp32.encoder), (half.decoder, fp32.decoder)):
        assert a.weight_bytes < 0.55 * b.weight_bytes  # matrices halved; biases stay fp32
    assert isinstance(half.head.w, Bf16Dense) and type(fp32.head.w) is Dense  # the original is untouched
    numbers = np.random.default_rng(7).integers(0, MAX_NUMBER + 1, 300)
    for n in numbers:
        src = np.array(encode_number(str(n)))
        assert decode_words(half.translate(src, 16)) == decode_words(fp32.translate(src, 16)), n


def test_bf16_silero_core_follows_fp32():
    """Silero VAD (the wheel's sequence file) with its LSTM core on bf16 weights: speech probabilities
    within 0.02 of the fp32 core's over real speech."""
    import wave

    silero_vad = pytest.importorskip("silero_vad")
    from pathlib import Path

    from cellserve.interop.onnx_import import import_onnx

    graph = Path(silero_vad.__file__).parent / "data" / "silero_vad_16k_sequence.onnx"
    model, half = import_onnx(graph), bf16_weights(import_onnx(graph), in_place=True)
    assert half.rnn.weight_bytes < 0.55 * model.rnn.weight_bytes
    with wave.open(str(Path(__file__).parent / "data" / "speech_16k.wav")) as f:
        samples = np.frombuffer(f.readframes(f.getnframes()), np.int16).astype(np.float32) / 32768
    windows = np.lib.stride_tricks.sliding_window_view(samples, 576)[::512][:200].astype(np.float32)
    zero = np.zeros((1, 1, 128), np.float32)
    feeds = {"input": np.ascontiguousarray(windows), "h": zero, "c": zero}
    want, got = model.forward(feeds)["speech_probs"], half.forward(feeds)["speech_probs"]
    assert np.abs(got - want).max() < 0.02
    assert ((got > 0.5) == (want > 0.5)).mean() > 0.98


def test_info_names_the_cpu_and_the_kernel_path(capsys):
    from cellserve.cli import main

    assert main(["info"]) == 0
    line = capsys.readouterr().out
    assert f"kernel path: {kernels.isa()}" in line and "CPU: " in line


def test_weight_dtype_bf16_in_a_model_config_serves_bf16_matrices(tmp_path):
    """`weight_dtype: bf16` in config.json: the repository loads the speller with bf16 matrices, and it
    answers as the fp32 one does."""
    import json

    from cellserve.server.repository import Repository
    from cellserve.tasks.speller import encode_number, load_default
    from cellserve.models.io import save

    folder = tmp_path / "speller16"
    folder.mkdir()
    save(load_default(), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"weight_dtype": "bf16", "text_codec": "number-speller"}))
    served = Repository.from_directory(tmp_path).models["speller16"]
    model = served.family.model
    assert all(isinstance(c.ih, Bf16Dense) and isinstance(c.hh, Bf16Dense) for c in model.decoder.cells)
    src = np.array(encode_number("40712"))
    assert model.translate(src, 16) == load_default().translate(src, 16)
    with pytest.raises(Exception, match="weight_dtype"):
        (folder / "config.json").write_text(json.dumps({"weight_dtype": "fp16"}))
        Repository.from_directory(tmp_path)
