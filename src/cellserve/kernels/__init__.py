"""Hot loops: matrix products and fused per-element gate math (NumPy + Numba, fp32)."""

from cellserve.kernels.dense import Dense, matmul
from cellserve.kernels import pointwise

__all__ = ["Dense", "matmul", "pointwise"]
