"""LSTM cell with torch's gate layout [i, f, g, o] and weights in (out, in) layout."""

from __future__ import annotations

import numpy as np

from cellserve.cells.base import Cell, f32
from cellserve.kernels import Dense, pointwise


class LSTMCell(Cell):
    kind = "lstm"

    def __init__(self, w_ih: np.ndarray, w_hh: np.ndarray, bias: np.ndarray):
        hidden = w_hh.shape[1]
        super().__init__(w_ih.shape[1], hidden)
        self.ih = Dense(w_ih)
        self.hh = Dense(w_hh)
        self.bias = f32(bias)  # b_ih + b_hh: the kernel adds them once

    def state_widths(self):
        return (self.hidden_size, self.hidden_size)

    def steps(self, xs, state):
        gi_all = self.project(self.ih, xs)
        hs = np.empty((*gi_all.shape[:2], self.hidden_size), dtype=np.float32)
        h, c = state[0], state[1].copy()
        for t in range(len(hs)):
            pointwise.lstm_step(gi_all[t], self.hh(h), self.bias, c, hs[t], c)
            h = hs[t]
        return hs, (hs[-1].copy(), c)

    def tensors(self):
        return {"w_ih": self.ih.weight, "w_hh": self.hh.weight, "bias": self.bias}

    @classmethod
    def tensor_shapes(cls, input_size, hidden_size, **options):
        return {"w_ih": (4 * hidden_size, input_size), "w_hh": (4 * hidden_size, hidden_size),
                "bias": (4 * hidden_size,)}

    @classmethod
    def from_tensors(cls, input_size, hidden_size, tensors, **options):
        return cls(tensors["w_ih"], tensors["w_hh"], tensors["bias"])
