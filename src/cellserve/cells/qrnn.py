"""QRNN cell with fo-pooling (Bradbury et al., "Quasi-Recurrent Neural Networks", 2016).

The gates come from a masked convolution over time of width 1 or 2, i.e. a product of
[x_{t-1}, x_t] with the weights, so k steps are one (k*B, window*in) x (window*in, 3H) product.
With window 2 the previous input is part of the state, so a stream can be cut into blocks anywhere.
"""

from __future__ import annotations

import numpy as np

from cellserve.cells.base import Cell, f32
from cellserve.kernels import Dense, load_dense
from cellserve.kernels.dense import PackedMatrix
from cellserve.kernels.recurrence import qrnn_steps


class QRNNCell(Cell):
    kind = "qrnn"

    def __init__(self, weight, bias, window: int = 1):
        """weight: an fp32 array, or a packed matrix (Bf16Dense, ...) kept as it is."""
        if window not in (1, 2):
            raise ValueError(f"QRNN window must be 1 or 2, got {window}")
        hidden = bias.shape[0] // 3
        w = weight if isinstance(weight, PackedMatrix) else Dense(weight)
        super().__init__(w.in_features // window, hidden)
        self.w = w  # rows [z, f, o]; columns [x_{t-1} (window 2 only), x_t]
        self.bias = f32(bias)
        self.window = window

    def state_widths(self):
        widths = (self.hidden_size, self.hidden_size)
        return widths + ((self.input_size,) if self.window == 2 else ())

    def steps(self, xs, state):
        steps, batch, _ = xs.shape
        xs = np.ascontiguousarray(xs, dtype=np.float32)
        if self.window == 2:
            windowed = np.empty((steps, batch, 2 * self.input_size), dtype=np.float32)
            windowed[0, :, : self.input_size] = state[2]
            windowed[1:, :, : self.input_size] = xs[:-1]
            windowed[:, :, self.input_size:] = xs
        else:
            windowed = xs
        c = np.array(state[1], dtype=np.float32)
        hs = np.empty((steps, batch, self.hidden_size), dtype=np.float32)
        qrnn_steps(self.w, windowed, self.bias, c, hs)
        new_state = (hs[-1].copy(), c)
        return hs, new_state + ((xs[-1].copy(),) if self.window == 2 else ())

    def options(self):
        return {"window": self.window}

    def tensors(self):
        return {**self.w.tensors("weight"), "bias": self.bias}

    @classmethod
    def tensor_shapes(cls, input_size, hidden_size, window=1, **options):
        return {"weight": (3 * hidden_size, window * input_size), "bias": (3 * hidden_size,)}

    @classmethod
    def from_tensors(cls, input_size, hidden_size, tensors, window=1, **options):
        return cls(load_dense("weight", tensors), tensors["bias"], window)
