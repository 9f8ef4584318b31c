"""GRU cell with torch's gate layout [r, z, n]; b_hh stays separate because r scales (W_hn h + b_hn)."""

from __future__ import annotations

import numpy as np

from cellserve.cells.base import Cell, f32
from cellserve.kernels import Dense, pointwise


class GRUCell(Cell):
    kind = "gru"

    def __init__(self, w_ih, w_hh, b_ih, b_hh):
        super().__init__(w_ih.shape[1], w_hh.shape[1])
        self.ih = Dense(w_ih)
        self.hh = Dense(w_hh)
        self.b_ih = f32(b_ih)
        self.b_hh = f32(b_hh)

    def steps(self, xs, state):
        gi_all = self.project(self.ih, xs)
        hs = np.empty((*gi_all.shape[:2], self.hidden_size), dtype=np.float32)
        (h,) = state
        for t in range(len(hs)):
            gh = self.hh(h)
            pointwise.gru_step(gi_all[t], gh, self.b_ih, self.b_hh, h, hs[t])
            h = hs[t]
        return hs, (hs[-1].copy(),)

    def tensors(self):
        return {"w_ih": self.ih.weight, "w_hh": self.hh.weight, "b_ih": self.b_ih, "b_hh": self.b_hh}

    @classmethod
    def tensor_shapes(cls, input_size, hidden_size, **options):
        return {"w_ih": (3 * hidden_size, input_size), "w_hh": (3 * hidden_size, hidden_size),
                "b_ih": (3 * hidden_size,), "b_hh": (3 * hidden_size,)}

    @classmethod
    def from_tensors(cls, input_size, hidden_size, tensors, **options):
        return cls(tensors["w_ih"], tensors["w_hh"], tensors["b_ih"], tensors["b_hh"])
