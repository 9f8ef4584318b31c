"""SRU cell (Lei et al., "Simple Recurrent Units for Highly Parallelizable Recurrence", 2018).

Every matrix product depends on x only, so k steps cost one (k*B, in) x (in, 3H) product plus a cheap
element-wise scan: the weights are read once per k steps. The highway connection carries x itself when
input_size == hidden_size and a learned projection W_hw x otherwise (4 blocks of rows instead of 3).
"""

from __future__ import annotations

import numpy as np

from cellserve.cells.base import Cell, f32
from cellserve.kernels import Dense, load_dense
from cellserve.kernels.dense import PackedMatrix
from cellserve.kernels.recurrence import sru_steps


class SRUCell(Cell):
    kind = "sru"

    def __init__(self, weight, v_f, v_r, b_f, b_r, activation: str = "tanh"):
        """weight: an fp32 array, or a packed matrix (Bf16Dense, ...) kept as it is."""
        w = weight if isinstance(weight, PackedMatrix) else Dense(weight)
        hidden = v_f.shape[0]
        super().__init__(w.in_features, hidden)
        if activation not in ("tanh", "identity"):
            raise ValueError(f"SRU activation must be 'tanh' or 'identity', got {activation!r}")
        blocks = 3 if self.input_size == hidden else 4
        if w.out_features != blocks * hidden:
            raise ValueError(f"SRU weight needs {blocks}*hidden rows for input {self.input_size}, got "
                             f"{(w.out_features, w.in_features)}")
        self.w = w
        self.v_f, self.v_r, self.b_f, self.b_r = f32(v_f), f32(v_r), f32(b_f), f32(b_r)
        self.activation = activation

    def state_widths(self):
        return (self.hidden_size, self.hidden_size)

    def steps(self, xs, state):
        steps, batch, _ = xs.shape
        hidden = self.hidden_size
        xs = np.ascontiguousarray(xs, dtype=np.float32)
        c = np.array(state[1], dtype=np.float32)
        hs = np.empty((steps, batch, hidden), dtype=np.float32)
        sru_steps(self.w, xs, self.v_f, self.v_r, self.b_f, self.b_r, c, hs, self.activation == "tanh")
        return hs, (hs[-1].copy(), c)

    def options(self):
        return {"activation": self.activation}

    def tensors(self):
        return {**self.w.tensors("weight"), "v_f": self.v_f, "v_r": self.v_r, "b_f": self.b_f, "b_r": self.b_r}

    @classmethod
    def tensor_shapes(cls, input_size, hidden_size, **options):
        blocks = 3 if input_size == hidden_size else 4
        vec = (hidden_size,)
        return {"weight": (blocks * hidden_size, input_size), "v_f": vec, "v_r": vec, "b_f": vec, "b_r": vec}

    @classmethod
    def from_tensors(cls, input_size, hidden_size, tensors, activation="tanh", **options):
        return cls(load_dense("weight", tensors), tensors["v_f"], tensors["v_r"], tensors["b_f"], tensors["b_r"], activation)
