"""LSTM, GRU, SRU and QRNN recurrences on the native core: one call per step, or per block of steps.

A step computes both products (x W_ih^T, then h W_hh^T added onto it: two sequential passes, each matrix
streamed once) and the fused gate math in one call, so Python dispatch is paid once per step. A sequence
takes the input projections of all T steps (one product, see Cell.project) and runs the T recurrent
products and gate updates inside one call. Matrices are Dense or QuantizedDense (int8 activations per
row, per step). SRU and QRNN have no product inside their recurrence: a block of k steps is one
product (weights read once per k steps) and an element-wise scan, in one call. The LSTM cell state can be held on a fixed grid (cell_quant = (step, limit)), as in
quantization-aware training of its precision.
"""

from __future__ import annotations

import numpy as np

from cellserve.kernels import _native
from cellserve.kernels.dense import rows


def _grid(cell_quant) -> tuple[float, float]:
    return (0.0, 0.0) if cell_quant is None else (float(cell_quant[0]), float(cell_quant[1]))


def lstm_step(ih, hh, bias, x, h, c, cell_quant=None, out=None) -> tuple[np.ndarray, np.ndarray]:
    """One LSTM step for a batch: returns the new (h, c), written into out = (h_out, c_out) when given
    (which may be (h, c) themselves: the products read h before the gate math writes)."""
    x, h, c = rows(x), rows(h), rows(c)
    h_out, c_out = out if out is not None else (np.empty(h.shape, np.float32), np.empty(c.shape, np.float32))
    _native.lstm_step(x, h, c, ih.packed, hh.packed, bias, h_out, c_out, *_grid(cell_quant))
    return h_out, c_out


def lstm_sequence(hh, gi_all, bias, h0, c, hs, cell_quant=None) -> None:
    """T steps: gi_all (T, B, 4H) input projections; fills hs (T, B, H) and updates c (B, H) in place."""
    _native.lstm_sequence(gi_all, hh.packed, bias, rows(h0), c, hs, *_grid(cell_quant))


def gru_step(ih, hh, b_ih, b_hh, x, h, out=None) -> np.ndarray:
    """One GRU step for a batch: returns the new h (written into out, which may be h itself)."""
    x, h = rows(x), rows(h)
    h_out = out if out is not None else np.empty(h.shape, np.float32)
    _native.gru_step(x, h, ih.packed, hh.packed, b_ih, b_hh, h_out)
    return h_out


def gru_sequence(hh, gi_all, b_ih, b_hh, h0, hs) -> None:
    """T steps: gi_all (T, B, 3H) = x W_ih^T without bias; fills hs (T, B, H)."""
    _native.gru_sequence(gi_all, hh.packed, b_ih, b_hh, rows(h0), hs)


def sru_steps(w, xs, v_f, v_r, b_f, b_r, c, hs, use_tanh: bool) -> None:
    """k SRU steps: xs (k, B, in) C-contiguous; c (B, H) updated in place; fills hs (k, B, H)."""
    _native.sru_steps(xs, w.packed, v_f, v_r, b_f, b_r, c, hs, use_tanh)


def qrnn_steps(w, windowed, bias, c, hs) -> None:
    """k QRNN steps: windowed (k, B, window*in) C-contiguous; c (B, H) updated in place; fills hs."""
    _native.qrnn_steps(windowed, w.packed, bias, c, hs)
