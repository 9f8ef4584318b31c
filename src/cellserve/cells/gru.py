"""GRU cell with torch's gate layout [r, z, n]; b_hh stays separate because r scales (W_hn h + b_hn)."""

from __future__ import annotations

import numpy as np

from cellserve.cells.base import Cell, f32
from cellserve.kernels import Dense, _native, load_dense
from cellserve.kernels.recurrence import gru_sequence, gru_step


class GRUCell(Cell):
    kind = "gru"

    def __init__(self, w_ih, w_hh, b_ih, b_hh):
        """w_ih, w_hh: fp32 arrays or Dense-like matrices (quantized ones from compress/)."""
        self.ih = w_ih if hasattr(w_ih, "dense_weight") else Dense(w_ih)
        self.hh = w_hh if hasattr(w_hh, "dense_weight") else Dense(w_hh)
        super().__init__(self.ih.in_features, self.hh.in_features)
        self.b_ih = f32(b_ih)
        self.b_hh = f32(b_hh)

    def step(self, x, state):
        return (gru_step(self.ih, self.hh, self.b_ih, self.b_hh, x, state[0]),)

    def step_into(self, x, state):
        _native.gru_step(x, state[0], self.ih.packed, self.hh.packed, self.b_ih, self.b_hh, state[0])

    def steps(self, xs, state):
        if len(xs) == 1:
            (h,) = self.step(xs[0], state)
            return h[None], (h,)
        gi_all = self.project(self.ih, xs)
        hs = np.empty((*gi_all.shape[:2], self.hidden_size), dtype=np.float32)
        gru_sequence(self.hh, gi_all, self.b_ih, self.b_hh, state[0], hs)
        return hs, (hs[-1].copy(),)

    def tensors(self):
        return {**self.ih.tensors("w_ih"), **self.hh.tensors("w_hh"), "b_ih": self.b_ih, "b_hh": self.b_hh}

    @classmethod
    def tensor_shapes(cls, input_size, hidden_size, **options):
        return {"w_ih": (3 * hidden_size, input_size), "w_hh": (3 * hidden_size, hidden_size),
                "b_ih": (3 * hidden_size,), "b_hh": (3 * hidden_size,)}

    @classmethod
    def from_tensors(cls, input_size, hidden_size, tensors, **options):
        return cls(load_dense("w_ih", tensors), load_dense("w_hh", tensors), tensors["b_ih"], tensors["b_hh"])
