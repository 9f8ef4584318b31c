"""The non-recurrent pieces composite models share: token embedding and an affine output head."""

from __future__ import annotations

import numpy as np

from cellserve.cells.base import f32
from cellserve.kernels import Dense, _native, load_dense
from cellserve.kernels.dense import rows


class Embedding:
    def __init__(self, table: np.ndarray):
        self.table = f32(table)
        self.vocab_size, self.dim = self.table.shape

    def __call__(self, tokens) -> np.ndarray:
        tokens = np.asarray(tokens)
        if tokens.size and (not np.issubdtype(tokens.dtype, np.integer)
                            or tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"token ids must be integers in [0, {self.vocab_size}), got "
                             f"{tokens.min() if tokens.size else ''}..{tokens.max() if tokens.size else ''}")
        return self.table[tokens]

    def tensors(self) -> dict:
        return {"table": self.table}


class Linear:
    """y = x W^T + b, W in (out, in) layout like torch.nn.Linear; W is an fp32 array or a Dense-like matrix
    (a quantized head: compress/)."""

    def __init__(self, weight, bias: np.ndarray):
        self.w = weight if hasattr(weight, "dense_weight") else Dense(weight)
        self.bias = f32(bias)
        self.out_features, self.in_features = self.w.out_features, self.w.in_features

    def __call__(self, x: np.ndarray) -> np.ndarray:
        flat = rows(x.reshape(-1, self.in_features))
        y = np.empty((flat.shape[0], self.out_features), np.float32)
        _native.gemm(flat, self.w.packed, y, None, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def tensors(self) -> dict:
        return {**self.w.tensors("weight"), "bias": self.bias}

    @classmethod
    def from_tensors(cls, tensors: dict) -> "Linear":
        return cls(load_dense("weight", tensors), tensors["bias"])

    @classmethod
    def random(cls, in_features: int, out_features: int, rng) -> "Linear":
        bound = 1.0 / np.sqrt(in_features)
        return cls(rng.uniform(-bound, bound, (out_features, in_features)).astype(np.float32),
                   rng.uniform(-bound, bound, out_features).astype(np.float32))


def random_embedding(vocab_size: int, dim: int, rng) -> Embedding:
    return Embedding(rng.standard_normal((vocab_size, dim)).astype(np.float32))
