"""LSTM cell with torch's gate layout [i, f, g, o] and weights in (out, in) layout."""

from __future__ import annotations

import numpy as np

from cellserve.cells.base import Cell, f32
from cellserve.kernels import Dense, _native, load_dense
from cellserve.kernels.recurrence import lstm_sequence, lstm_step


class LSTMCell(Cell):
    kind = "lstm"

    def __init__(self, w_ih, w_hh, bias: np.ndarray, cell_quant: tuple[float, float] | None = None):
        """w_ih, w_hh: fp32 arrays or Dense-like matrices (quantized ones from compress/).
        cell_quant (step, limit): hold the cell state on that grid, as the model was trained."""
        self.ih = w_ih if hasattr(w_ih, "dense_weight") else Dense(w_ih)
        self.hh = w_hh if hasattr(w_hh, "dense_weight") else Dense(w_hh)
        super().__init__(self.ih.in_features, self.hh.in_features)
        self.bias = f32(bias)  # b_ih + b_hh: the kernel adds them once
        self.cell_quant = None if cell_quant is None else (float(cell_quant[0]), float(cell_quant[1]))

    @property
    def _grid(self) -> tuple[float, float]:
        return self.cell_quant or (0.0, 0.0)

    def state_widths(self):
        return (self.hidden_size, self.hidden_size)

    def step(self, x, state):
        return lstm_step(self.ih, self.hh, self.bias, x, state[0], state[1], self.cell_quant)

    def step_into(self, x, state):
        h, c = state
        _native.lstm_step(x, h, c, self.ih.packed, self.hh.packed, self.bias, h, c, *self._grid)

    def steps(self, xs, state):
        if len(xs) == 1:
            h, c = self.step(xs[0], state)
            return h[None], (h, c)
        gi_all = self.project(self.ih, xs)
        hs = np.empty((*gi_all.shape[:2], self.hidden_size), dtype=np.float32)
        c = np.array(state[1], dtype=np.float32)
        lstm_sequence(self.hh, gi_all, self.bias, state[0], c, hs, self.cell_quant)
        return hs, (hs[-1].copy(), c)

    def tensors(self):
        out = {**self.ih.tensors("w_ih"), **self.hh.tensors("w_hh"), "bias": self.bias}
        if self.cell_quant is not None:
            out["cell_quant"] = np.array(self.cell_quant, dtype=np.float32)
        return out

    @classmethod
    def tensor_shapes(cls, input_size, hidden_size, **options):
        return {"w_ih": (4 * hidden_size, input_size), "w_hh": (4 * hidden_size, hidden_size),
                "bias": (4 * hidden_size,)}

    @classmethod
    def from_tensors(cls, input_size, hidden_size, tensors, **options):
        cell_quant = tensors.get("cell_quant")
        return cls(load_dense("w_ih", tensors), load_dense("w_hh", tensors), tensors["bias"],
                   None if cell_quant is None else tuple(cell_quant))
