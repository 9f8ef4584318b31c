"""The LSTM recurrence over a whole sequence in one compiled loop.

Per step, Python dispatch (a matmul call, a pointwise call, slicing) costs more than the arithmetic at
small batch and hidden sizes; here the T steps run inside one kernel: h_{t-1} @ W_hh, the gates and the
state update. Variants for fp32 and int8 W_hh (packed low-bit W_hh is unpacked to int8 once per call,
see kernels.quantized). Optionally the
cell state is held on a fixed grid (cell_step, clipped to +-cell_limit), as in quantization-aware
training of the cell state's precision; cell_step 0 keeps it in fp32.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from cellserve.kernels import pointwise
from cellserve.kernels.dense import Dense, matmul
from cellserve.kernels.pointwise import lstm_unit, tanh
from cellserve.kernels.quantized import QuantizedDense, dot_i8, quantize_rows, round_code

F1, F2, F3 = "float32[::1]", "float32[:, ::1]", "float32[:, :, ::1]"
KERNEL = dict(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "contract", "nsz", "arcp"})
LOOP_BATCH_MIN = 4  # from here, fp32 steps go through the blocked/BLAS matmul, which batches better


@njit(inline="always")
def _update(gates, hidden, c, b, h_out, cell_step, cell_limit):
    """gates (4H) = all pre-activations [i, f, g, o] -> c[b] and h_out updated in place."""
    for j in range(hidden):
        cell, o = lstm_unit(gates[j], gates[hidden + j], gates[2 * hidden + j], gates[3 * hidden + j], c[b, j])
        if cell_step > 0:
            cell = np.float32(round_code(cell / cell_step, cell_limit / cell_step)) * cell_step
        c[b, j] = cell
        h_out[j] = o * tanh(cell)


@njit(f"void({F3}, {F2}, {F1}, {F2}, {F2}, {F3}, float32, float32)", **KERNEL)
def lstm_sequence_f32(gi_all, w_hh, bias, h0, c, hs, cell_step, cell_limit):
    steps, batch, width = gi_all.shape
    hidden = width // 4
    gates = np.empty(width, dtype=np.float32)
    for t in range(steps):
        for b in range(batch):
            h_prev = hs[t - 1, b] if t > 0 else h0[b]
            for n in range(width):
                acc = np.float32(0.0)
                for k in range(hidden):
                    acc += h_prev[k] * w_hh[n, k]
                gates[n] = acc + gi_all[t, b, n] + bias[n]
            _update(gates, hidden, c, b, hs[t, b], cell_step, cell_limit)


@njit(f"void({F3}, int8[:, ::1], {F1}, float32, {F1}, {F2}, {F2}, {F3}, float32, float32)", **KERNEL)
def lstm_sequence_i8(gi_all, wq, w_scales, act_scale, bias, h0, c, hs, cell_step, cell_limit):
    steps, batch, width = gi_all.shape
    hidden = width // 4
    gates = np.empty(width, dtype=np.float32)
    hq = np.zeros((1, hidden), dtype=np.int8)
    scale = np.zeros(1, dtype=np.float32)
    for t in range(steps):
        for b in range(batch):
            h_prev = hs[t - 1, b] if t > 0 else h0[b]
            quantize_rows(h_prev.reshape((1, hidden)), act_scale, hq, scale)
            for n in range(width):
                acc = dot_i8(hq, 0, wq, n, hidden)
                gates[n] = np.float32(acc) * scale[0] * w_scales[n] + gi_all[t, b, n] + bias[n]
            _update(gates, hidden, c, b, hs[t, b], cell_step, cell_limit)


def lstm_sequence(hh, gi_all: np.ndarray, bias: np.ndarray, h0: np.ndarray, c: np.ndarray, hs: np.ndarray,
                  cell_quant: tuple[float, float] | None = None) -> None:
    """Run T LSTM steps: gi_all (T, B, 4H) input projections, h0 (B, H); fills hs (T, B, H), updates c."""
    step, limit = (np.float32(v) for v in (cell_quant or (0.0, 0.0)))
    if isinstance(hh, QuantizedDense):  # packed low-bit weights: unpacked once for all T steps
        lstm_sequence_i8(gi_all, hh.int_codes(), hh.scale, hh.act_scale, bias, h0, c, hs, step, limit)
    elif isinstance(hh, Dense) and (gi_all.shape[1] < LOOP_BATCH_MIN or step > 0):
        lstm_sequence_f32(gi_all, hh.weight, bias, h0, c, hs, step, limit)
    else:
        h = h0
        for t in range(len(hs)):
            pointwise.lstm_step(gi_all[t], hh(h), bias, c, hs[t], c)
            h = hs[t]
