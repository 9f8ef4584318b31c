"""Matrix products for cell steps.

Weights are kept in torch's (out_features, in_features) layout. The product picks its path by
batch rows M, because OpenBLAS's GEMM packs the whole weight matrix on every call, which at
small M costs several times a GEMV (measured: M=2 is ~7x slower than M=1 at 512x1024):
  M == 1      BLAS GEMV, reads the weights once;
  2 <= M <= 8 a Numba dot-product kernel that streams each weight row once for all M rows;
  M > 8       BLAS GEMM, where packing pays for itself.
"""

import numpy as np
from numba import njit

SMALL_BATCH_MAX = 8


@njit("void(float32[:, ::1], float32[:, ::1], float32[:, ::1])", cache=True, fastmath=True, nogil=True)
def _matmul_rows(x, weight, out):
    """out = x @ weight.T for a few rows: each weight row is loaded once and used by 4 rows of x."""
    m_total, k_total = x.shape
    n_total = weight.shape[0]
    for n in range(n_total):
        m = 0
        while m + 4 <= m_total:
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            for k in range(k_total):
                w = weight[n, k]
                a0 += x[m, k] * w
                a1 += x[m + 1, k] * w
                a2 += x[m + 2, k] * w
                a3 += x[m + 3, k] * w
            out[m, n] = a0
            out[m + 1, n] = a1
            out[m + 2, n] = a2
            out[m + 3, n] = a3
            m += 4
        while m < m_total:
            acc = np.float32(0.0)
            for k in range(k_total):
                acc += x[m, k] * weight[n, k]
            out[m, n] = acc
            m += 1


def matmul(x: np.ndarray, weight: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Return x @ weight.T for x (M, in) and weight (out, in), both C-contiguous float32."""
    m = x.shape[0]
    if out is None:
        out = np.empty((m, weight.shape[0]), dtype=np.float32)
    if m == 1:
        np.matmul(weight, x[0], out=out[0])
    elif m <= SMALL_BATCH_MAX:
        _matmul_rows(np.ascontiguousarray(x), weight, out)
    else:
        np.matmul(x, weight.T, out=out)
    return out


class Dense:
    """A weight matrix a cell multiplies by. Quantized variants (compress/) keep this interface."""

    def __init__(self, weight: np.ndarray):
        self.weight = np.ascontiguousarray(weight, dtype=np.float32)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return matmul(x, self.weight, out)

    def dense_weight(self) -> np.ndarray:
        """The fp32 matrix (exact here; dequantized for quantized variants)."""
        return self.weight
