"""Hot loops: matrix products (fp32, int8, packed low-bit), fused gate math and recurrences (NumPy + Numba)."""

from cellserve.kernels.dense import Dense, matmul
from cellserve.kernels import pointwise
from cellserve.kernels.quantized import QuantizedDense


def load_dense(name: str, tensors: dict):
    """The matrix saved under `name` by Dense.tensors or QuantizedDense.tensors."""
    return Dense(tensors[name]) if name in tensors else QuantizedDense.from_tensors(name, tensors)


__all__ = ["Dense", "QuantizedDense", "load_dense", "matmul", "pointwise"]
