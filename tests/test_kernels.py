"""The native kernel core against numpy, on every instruction-set path this CPU can run, with shapes that
are no multiple of any tile (M, K, N in 1, 3, 17, 255, ...): fp32 to rtol 1e-5, integer products exactly."""

import os
import subprocess
import sys

import numpy as np
import pytest

from cellserve import kernels
from cellserve.kernels import Dense, QuantizedDense, _native
from cellserve.kernels.quantized import quantize_rows
from cellserve.kernels.recurrence import gru_sequence, gru_step, lstm_sequence, lstm_step

SHAPES = [(1, 1, 1), (1, 3, 17), (3, 17, 255), (17, 255, 3), (255, 17, 33), (2, 300, 70), (13, 64, 96),
          (16, 129, 64), (33, 40, 31), (1, 1000, 45), (70, 5, 257),
          (40, 300, 70), (30, 600, 40),  # several row tiles over 2-5 k blocks (k_block_rows: 128 or 256)
          (21, 1100, 70)]  # and of int8 (128 chunks of 4 k), the last tile short, the last k block too


@pytest.fixture(params=kernels.isas())
def isa(request):
    """Runs the test once per ISA path the CPU supports, restoring the default afterwards."""
    default = kernels.isa()
    kernels.set_isa(request.param)
    yield request.param
    kernels.set_isa(default)


def close(actual, expected, rtol=1e-5):
    expected = np.asarray(expected)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * max(1.0, np.abs(expected).max()))


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_fp32_product_matches_numpy(isa, m, k, n, rng):
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    close(Dense(w)(x), x.astype(np.float64) @ w.T.astype(np.float64))


def test_packing_round_trips_and_packed_equals_unpacked(isa, rng):
    """Unpacking returns the exact matrix; a matrix packed once gives what a fresh one gives."""
    w = rng.standard_normal((77, 45)).astype(np.float32)
    dense = Dense(w)
    np.testing.assert_array_equal(dense.weight, w)
    x = rng.standard_normal((9, 45)).astype(np.float32)
    first = dense(x)
    np.testing.assert_array_equal(Dense(dense.weight)(x), first)
    np.testing.assert_array_equal(dense(x), first)


@pytest.mark.parametrize("m,k", [(11, 23), (30, 300)])
def test_addend_bias_and_strided_rows(isa, m, k, rng):
    """out = addend + x @ W^T + bias, with x a row-strided view (no copy) and the addend aliasing out (also
    where fp32 sums pass through several k blocks before out is written)."""
    w = rng.standard_normal((40, k)).astype(np.float32)
    big = rng.standard_normal((m, k + 27)).astype(np.float32)
    x = big[:, 3:k + 3]  # rows k + 27 floats apart
    bias = rng.standard_normal(40).astype(np.float32)
    out = rng.standard_normal((m, 40)).astype(np.float32)
    expected = out.astype(np.float64) + x.astype(np.float64) @ w.T + bias
    _native.gemm(x, Dense(w).packed, out, out, bias)
    close(out, expected)


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_int8_product_is_exact(isa, m, k, n, rng):
    q = rng.integers(-127, 128, (n, k)).astype(np.int8)
    xq = rng.integers(-127, 128, (m, k)).astype(np.int8)
    dense = QuantizedDense(q, np.ones(n, np.float32))
    out = np.empty((m, n), np.int32)
    _native.gemm_s32(xq, dense.packed, out)
    np.testing.assert_array_equal(out, xq.astype(np.int64) @ q.T.astype(np.int64))
    np.testing.assert_array_equal(dense.int_codes(), q)


@pytest.mark.parametrize("m", [5, 20])  # one row tile; several, their sums carried between k blocks
def test_int8_extremes_do_not_overflow(isa, m):
    """All-(+-127) operands at K = 4096: the largest sums an int8 product can meet, still exact in int32."""
    k = 4096
    q = np.full((33, k), -127, np.int8)
    q[::2] = 127
    xq = np.full((m, k), -127, np.int8)
    out = np.empty((m, 33), np.int32)
    _native.gemm_s32(xq, QuantizedDense(q, np.ones(33, np.float32)).packed, out)
    np.testing.assert_array_equal(out, xq.astype(np.int64) @ q.T.astype(np.int64))


def reference_codes(x, static_scale):
    """The quantization rule in numpy: scale max|x|/127 (or fixed), round half away from zero, clip."""
    scale = np.where(np.abs(x).max(1) > 0, np.abs(x).max(1) / np.float32(127), 1).astype(np.float32)
    if static_scale:
        scale[:] = static_scale
    v = np.clip(x * (np.float32(1) / scale[:, None]), -127, 127)
    return (np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))).astype(np.int8), scale


@pytest.mark.parametrize("static_scale", [0.0, 1 / 7])
def test_activation_quantization_rule(isa, static_scale, rng):
    x = rng.standard_normal((6, 37)).astype(np.float32) * 2
    x[2] = 0.0
    x[3, :5] = [0.5 / 7, -0.5 / 7, 1.5 / 7, 300, -300]
    codes, scales = quantize_rows(x, static_scale)
    ref_codes, ref_scales = reference_codes(x, static_scale)
    np.testing.assert_array_equal(scales, ref_scales)
    np.testing.assert_array_equal(codes, ref_codes)


@pytest.mark.parametrize("m,k,n", SHAPES[:8])
def test_int8_float_product_is_dequantized_integer_math(isa, m, k, n, rng):
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    dense = QuantizedDense.from_float(w, 8)
    xq, xs = quantize_rows(x)
    exact = (xq.astype(np.int64) @ dense.int_codes().T.astype(np.int64)).astype(np.float64)
    close(dense(x), exact * xs[:, None] * dense.scale[None, :])


def sigmoid(v):
    return 1 / (1 + np.exp(-v))


def lstm_reference(w_ih, w_hh, bias, x, h, c):
    g = x.astype(np.float64) @ w_ih.T + h @ w_hh.T + bias
    i, f, gg, o = np.split(g, 4, axis=1)
    c = sigmoid(f) * c + sigmoid(i) * np.tanh(gg)
    return sigmoid(o) * np.tanh(c), c


def gru_reference(w_ih, w_hh, b_ih, b_hh, x, h):
    gi = x.astype(np.float64) @ w_ih.T + b_ih
    gh = h.astype(np.float64) @ w_hh.T + b_hh
    r = sigmoid(gi[:, :gh.shape[1] // 3] + gh[:, :gh.shape[1] // 3])
    hidden = h.shape[1]
    z = sigmoid(gi[:, hidden:2 * hidden] + gh[:, hidden:2 * hidden])
    n = np.tanh(gi[:, 2 * hidden:] + r * gh[:, 2 * hidden:])
    return (1 - z) * n + z * h


@pytest.mark.parametrize("batch,inputs,hidden", [(1, 3, 5), (3, 17, 33), (17, 10, 40)])
def test_lstm_step_and_sequence_match_numpy(isa, batch, inputs, hidden, rng):
    w_ih = rng.standard_normal((4 * hidden, inputs)).astype(np.float32) * 0.3
    w_hh = rng.standard_normal((4 * hidden, hidden)).astype(np.float32) * 0.3
    bias = rng.standard_normal(4 * hidden).astype(np.float32)
    xs = rng.standard_normal((5, batch, inputs)).astype(np.float32)
    h0 = rng.standard_normal((batch, hidden)).astype(np.float32)
    c0 = rng.standard_normal((batch, hidden)).astype(np.float32)
    ih, hh = Dense(w_ih), Dense(w_hh)
    h, c = h0, c0
    hs_ref = []
    for x in xs:
        h_new, c_new = lstm_step(ih, hh, bias, x, h, c)
        h, c = lstm_reference(w_ih, w_hh, bias, x, h, c)
        close(h_new, h, 1e-5)
        close(c_new, c, 1e-5)
        h, c = h_new, c_new
        hs_ref.append(h)
    gi_all = ih(xs.reshape(-1, inputs)).reshape(5, batch, -1)
    hs = np.empty((5, batch, hidden), np.float32)
    c = c0.copy()
    lstm_sequence(hh, gi_all, bias, h0, c, hs)
    close(hs, np.stack(hs_ref), 1e-5)


@pytest.mark.parametrize("batch,inputs,hidden", [(1, 3, 5), (3, 17, 33), (17, 10, 40)])
def test_gru_step_and_sequence_match_numpy(isa, batch, inputs, hidden, rng):
    w_ih = rng.standard_normal((3 * hidden, inputs)).astype(np.float32) * 0.3
    w_hh = rng.standard_normal((3 * hidden, hidden)).astype(np.float32) * 0.3
    b_ih, b_hh = (rng.standard_normal(3 * hidden).astype(np.float32) for _ in range(2))
    xs = rng.standard_normal((4, batch, inputs)).astype(np.float32)
    h0 = rng.standard_normal((batch, hidden)).astype(np.float32)
    ih, hh = Dense(w_ih), Dense(w_hh)
    h, hs_ref = h0, []
    for x in xs:
        h_new = gru_step(ih, hh, b_ih, b_hh, x, h)
        close(h_new, gru_reference(w_ih, w_hh, b_ih, b_hh, x, h), 1e-5)
        h = h_new
        hs_ref.append(h)
    hs = np.empty((4, batch, hidden), np.float32)
    gru_sequence(hh, ih(xs.reshape(-1, inputs)).reshape(4, batch, -1), b_ih, b_hh, h0, hs)
    close(hs, np.stack(hs_ref), 1e-5)


def test_gate_math_is_accurate_over_the_fp32_range(isa):
    """With zero weights the gates are the bias: h = sig(o) * tanh(sig(f) c + sig(i) tanh(g)) over a sweep
    of pre-activations from -40 to 40 (the vector and scalar tails both)."""
    hidden = 4001
    values = np.linspace(-40, 40, hidden).astype(np.float32)
    zeros = Dense(np.zeros((4 * hidden, 1), np.float32)), Dense(np.zeros((4 * hidden, hidden), np.float32))
    c0 = np.linspace(-3, 3, hidden, dtype=np.float32)[None]
    for order in ([0, 1, 2, 3], [2, 3, 0, 1]):
        bias = np.concatenate([np.roll(values, 7 * j) for j in order]).astype(np.float32)
        h, c = lstm_step(*zeros, bias, np.zeros((1, 1), np.float32), np.zeros((1, hidden), np.float32), c0)
        i, f, g, o = np.split(bias.astype(np.float64), 4)
        c_ref = sigmoid(f) * c0[0] + sigmoid(i) * np.tanh(g)
        assert np.abs(c[0] - c_ref).max() < 2e-6
        assert np.abs(h[0] - sigmoid(o) * np.tanh(c_ref)).max() < 2e-6


def test_results_do_not_depend_on_the_thread_count(rng):
    """Panels are split between threads, never a sum: results are bit-identical with 1 and 2 threads."""
    w = rng.standard_normal((1000, 300)).astype(np.float32)
    x = rng.standard_normal((20, 300)).astype(np.float32)
    dense, qdense = Dense(w), QuantizedDense.from_float(w, 8)
    one, q_one = dense(x), qdense(x)
    kernels.set_threads(2)
    try:
        assert kernels.get_threads() == 2
        np.testing.assert_array_equal(dense(x), one)
        np.testing.assert_array_equal(qdense(x), q_one)
    finally:
        kernels.set_threads(1)


def test_bad_arguments_are_clear_errors(rng):
    dense = Dense(rng.standard_normal((8, 5)).astype(np.float32))
    with pytest.raises(ValueError, match="x has 4 columns"):
        _native.gemm(np.zeros((2, 4), np.float32), dense.packed, np.zeros((2, 8), np.float32))
    with pytest.raises(TypeError, match="float32"):
        _native.gemm(np.zeros((2, 5), np.float64), dense.packed, np.zeros((2, 8), np.float32))
    with pytest.raises(ValueError, match="out has shape"):
        _native.gemm(np.zeros((2, 5), np.float32), dense.packed, np.zeros((3, 8), np.float32))
    with pytest.raises(TypeError, match="packed matrix"):
        _native.gemm(np.zeros((2, 5), np.float32), np.zeros((8, 5), np.float32), np.zeros((2, 8), np.float32))
    with pytest.raises(ValueError, match="threads"):
        kernels.set_threads(0)
    with pytest.raises(ValueError, match="unknown ISA"):
        kernels.set_isa("sse9")


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


@pytest.mark.parametrize("path", kernels.isas())
def test_cellserve_isa_forces_a_path(path):
    done = run_python("from cellserve import kernels; print(kernels.isa())", CELLSERVE_ISA=path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == path


def test_cellserve_isa_rejects_unknown_paths():
    done = run_python("import cellserve.kernels", CELLSERVE_ISA="neon9")
    assert done.returncode != 0
    assert "unknown ISA path neon9" in done.stderr


def test_numba_tanh_and_sigmoid_are_accurate_over_fp32_range():
    """The Numba copy of the same approximation (SRU, QRNN, TreeLSTM scans)."""
    from numba import njit

    from cellserve.kernels.treelstm import sigmoid as nb_sigmoid
    from cellserve.kernels.treelstm import tanh as nb_tanh

    @njit
    def both(x, t, s):
        for i in range(x.shape[0]):
            t[i] = nb_tanh(x[i])
            s[i] = nb_sigmoid(x[i])

    x = np.linspace(-40, 40, 400_001).astype(np.float32)
    t, s = np.empty_like(x), np.empty_like(x)
    both(x, t, s)
    x64 = x.astype(np.float64)
    assert np.abs(t - np.tanh(x64)).max() < 1e-6
    assert np.abs(s - 1 / (1 + np.exp(-x64))).max() < 1e-6
    assert t.max() <= 1 and t.min() >= -1 and s.min() >= 0 and s.max() <= 1


@pytest.mark.parametrize("inputs,hidden,use_tanh", [(5, 5, True), (7, 17, True), (33, 33, False)])
def test_sru_steps_match_numpy(isa, inputs, hidden, use_tanh, rng):
    """k SRU steps in one call: one product for the block, then the scan; highway from x or from W."""
    from cellserve.kernels.recurrence import sru_steps

    blocks = 3 if inputs == hidden else 4
    w = rng.standard_normal((blocks * hidden, inputs)).astype(np.float32) * 0.3
    v_f, v_r, b_f, b_r = (rng.standard_normal(hidden).astype(np.float32) for _ in range(4))
    xs = rng.standard_normal((6, 3, inputs)).astype(np.float32)
    c0 = rng.standard_normal((3, hidden)).astype(np.float32)
    c, hs = c0.copy(), np.empty((6, 3, hidden), np.float32)
    sru_steps(Dense(w), xs, v_f, v_r, b_f, b_r, c, hs, use_tanh)
    ref_c, ref = c0.astype(np.float64), []
    for x in xs:
        u = x.astype(np.float64) @ w.T
        f = sigmoid(u[:, hidden:2 * hidden] + v_f * ref_c + b_f)
        r = sigmoid(u[:, 2 * hidden:3 * hidden] + v_r * ref_c + b_r)
        ref_c = f * ref_c + (1 - f) * u[:, :hidden]
        highway = x if blocks == 3 else u[:, 3 * hidden:]
        ref.append(r * (np.tanh(ref_c) if use_tanh else ref_c) + (1 - r) * highway)
    close(hs, np.stack(ref))
    close(c, ref_c)


def test_qrnn_steps_match_numpy(isa, rng):
    from cellserve.kernels.recurrence import qrnn_steps

    hidden, width = 19, 14
    w = rng.standard_normal((3 * hidden, width)).astype(np.float32) * 0.3
    bias = rng.standard_normal(3 * hidden).astype(np.float32)
    xs = rng.standard_normal((5, 2, width)).astype(np.float32)
    c0 = rng.standard_normal((2, hidden)).astype(np.float32)
    c, hs = c0.copy(), np.empty((5, 2, hidden), np.float32)
    qrnn_steps(Dense(w), xs, bias, c, hs)
    ref_c, ref = c0.astype(np.float64), []
    for x in xs:
        u = x.astype(np.float64) @ w.T + bias
        z, f, o = np.tanh(u[:, :hidden]), sigmoid(u[:, hidden:2 * hidden]), sigmoid(u[:, 2 * hidden:])
        ref_c = f * ref_c + (1 - f) * z
        ref.append(o * ref_c)
    close(hs, np.stack(ref))
    close(c, ref_c)


GRIDS = {4: np.arange(-7, 8), 2: np.array([-1, 0, 1]), 1: np.array([-1, 1])}


@pytest.mark.parametrize("bits", [4, 2, 1])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_low_bit_products_are_exact(isa, bits, m, k, n, rng):
    """4/2/1-bit weights (stored several to a byte, widened in registers) against int64 numpy."""
    q = rng.choice(GRIDS[bits], size=(n, k)).astype(np.int8)
    xq = rng.integers(-127, 128, (m, k)).astype(np.int8)
    dense = QuantizedDense(q, np.ones(n, np.float32), bits)
    assert dense.packed.bits == bits
    out = np.empty((m, n), np.int32)
    _native.gemm_s32(xq, dense.packed, out)
    np.testing.assert_array_equal(out, xq.astype(np.int64) @ q.T.astype(np.int64))
    np.testing.assert_array_equal(dense.int_codes(), q)


@pytest.mark.parametrize("bits", [4, 2, 1])
def test_low_bit_matrices_hold_fewer_bytes_and_refuse_codes_off_their_grid(bits, rng):
    q = rng.choice(GRIDS[bits], size=(64, 256)).astype(np.int8)
    packed = QuantizedDense(q, np.ones(64, np.float32), bits).packed
    int8 = QuantizedDense(q, np.ones(64, np.float32), 8).packed
    assert packed.nbytes - 64 * 8 == (int8.nbytes - 64 * 8) * bits // 8
    bad = q.copy()
    bad[3, 5] = {4: 8, 2: 2, 1: 0}[bits]
    with pytest.raises(ValueError, match=f"not on the {bits}-bit grid"):
        _native.pack_s8(bad, np.ones(64, np.float32), 0.0, bits)


@pytest.mark.parametrize("bits", [4, 2, 1])
def test_low_bit_float_product_is_dequantized_integer_math(isa, bits, rng):
    w = rng.standard_normal((70, 45)).astype(np.float32)
    x = rng.standard_normal((9, 45)).astype(np.float32)
    dense = QuantizedDense.from_float(w, bits)
    xq, xs = quantize_rows(x)
    exact = (xq.astype(np.int64) @ dense.int_codes().T.astype(np.int64)).astype(np.float64)
    close(dense(x), exact * xs[:, None] * dense.scale[None, :])


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_block_sparse_equals_dense_on_the_same_masked_weights(isa, m, k, n, rng):
    from cellserve.kernels import BlockSparseDense

    w = rng.standard_normal((n, k)).astype(np.float32)
    groups = -(-n // 16)
    keep = rng.random((groups, k)) < 0.3  # blocks of 16 rows x 1 column
    w *= np.repeat(keep, 16, axis=0)[:n]
    x = rng.standard_normal((m, k)).astype(np.float32)
    sparse = BlockSparseDense(w)
    np.testing.assert_array_equal(sparse.weight, w)
    assert sparse.packed.kind == "bsr" and sparse.nbytes <= int(keep.sum()) * 68 + 4 * (groups + 1)
    saved = sparse.tensors("w")  # only the nonzero blocks are stored
    assert len(saved["w.blocks"]) <= int(keep.sum())
    np.testing.assert_array_equal(BlockSparseDense.from_tensors("w", saved).weight, w)
    close(sparse(x), x.astype(np.float64) @ w.T.astype(np.float64))
    bias = rng.standard_normal(n).astype(np.float32)
    out = rng.standard_normal((m, n)).astype(np.float32)
    expected = out.astype(np.float64) + x.astype(np.float64) @ w.T + bias
    _native.gemm(x, sparse.packed, out, out, bias)
    close(out, expected)


def test_amx_runs_by_default_where_the_cpu_and_the_os_allow_it():
    """Where the CPU has AMX-BF16 and AMX-INT8 and Linux grants the tile state, the bf16 and int8 products run on
    the tile units by default (the fixture above runs every product test on that path as well)."""
    from cellserve.bench.common import cpu_has_amx, machine_line

    if not cpu_has_amx():
        pytest.skip("this CPU has no AMX-BF16 and AMX-INT8")
    if "avx512-amx" not in kernels.isas():
        assert "AMX refused by the OS" in machine_line()
        pytest.skip("the OS refused this process AMX's tile state (arch_prctl ARCH_REQ_XCOMP_PERM)")
    assert kernels.isa() == "avx512-amx"
