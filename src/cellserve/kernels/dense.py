"""Matrix products for cell steps.

Weights are kept in torch's (out_features, in_features) layout. The product picks its path by
batch rows M, because OpenBLAS's GEMM packs the whole weight matrix on every call, which at
small M costs several times a GEMV (measured: M=2 is ~7x slower than M=1 at 512x1024):
  M <= 32  Numba dot-product kernels that stream each weight row once for all M rows, with register
           blocking (4 input rows, and 2 weight rows once M >= 4). Measured on the dev machines: at
           M=1 as fast as OpenBLAS's GEMV on cached weights and up to 2x faster on weights streamed
           from DRAM; at 4 <= M <= 32, 1.5-2.5x faster than OpenBLAS's GEMM;
  M > 32   BLAS GEMM, where packing pays for itself.
Rows are not bit-identical across paths (summation order differs); they agree to fp32 rounding.
"""

import numpy as np
from numba import njit

SMALL_BATCH_MAX = 32
SIGNATURE = "void(float32[:, ::1], float32[:, ::1], float32[:, ::1])"
KERNEL = dict(cache=True, fastmath=True, nogil=True, error_model="numpy")


@njit(SIGNATURE, **KERNEL)
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


@njit(SIGNATURE, **KERNEL)
def _matmul_blocked(x, weight, out):
    """out = x @ weight.T, 2 weight rows x 4 input rows per block: 6 loads feed 8 multiply-adds."""
    m_total, k_total = x.shape
    n_total = weight.shape[0]
    n = 0
    while n + 2 <= n_total:
        m = 0
        while m + 4 <= m_total:
            a00 = a01 = a10 = a11 = a20 = a21 = a30 = a31 = np.float32(0.0)
            for k in range(k_total):
                w0 = weight[n, k]
                w1 = weight[n + 1, k]
                x0 = x[m, k]
                x1 = x[m + 1, k]
                x2 = x[m + 2, k]
                x3 = x[m + 3, k]
                a00 += x0 * w0
                a01 += x0 * w1
                a10 += x1 * w0
                a11 += x1 * w1
                a20 += x2 * w0
                a21 += x2 * w1
                a30 += x3 * w0
                a31 += x3 * w1
            out[m, n] = a00
            out[m, n + 1] = a01
            out[m + 1, n] = a10
            out[m + 1, n + 1] = a11
            out[m + 2, n] = a20
            out[m + 2, n + 1] = a21
            out[m + 3, n] = a30
            out[m + 3, n + 1] = a31
            m += 4
        while m < m_total:
            a0 = a1 = np.float32(0.0)
            for k in range(k_total):
                a0 += x[m, k] * weight[n, k]
                a1 += x[m, k] * weight[n + 1, k]
            out[m, n] = a0
            out[m, n + 1] = a1
            m += 1
        n += 2
    if n < n_total:
        for m in range(m_total):
            acc = np.float32(0.0)
            for k in range(k_total):
                acc += x[m, k] * weight[n, k]
            out[m, n] = acc


def matmul(x: np.ndarray, weight: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Return x @ weight.T for x (M, in) and weight (out, in), both C-contiguous float32."""
    m = x.shape[0]
    if out is None:
        out = np.empty((m, weight.shape[0]), dtype=np.float32)
    if m < 4:
        _matmul_rows(np.ascontiguousarray(x), weight, out)
    elif m <= SMALL_BATCH_MAX:
        _matmul_blocked(np.ascontiguousarray(x), weight, out)
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

    def tensors(self, name: str) -> dict[str, np.ndarray]:
        return {name: self.weight}
