import numpy as np
import pytest

from cellserve.kernels import dense


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 33])
def test_matmul_every_path_matches_numpy(rows, rng):
    """Each batch size takes its own path (GEMV, the Numba kernel, GEMM); all compute x @ W^T."""
    w = rng.standard_normal((48, 37)).astype(np.float32)
    x = rng.standard_normal((rows, 37)).astype(np.float32)
    np.testing.assert_allclose(dense.matmul(x, w), x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-4, atol=1e-4)


def test_small_batch_kernel_rows_are_independent(rng):
    """A row's result from the small-batch kernel does not depend on which rows share its batch."""
    w = rng.standard_normal((64, 128)).astype(np.float32)
    x = rng.standard_normal((8, 128)).astype(np.float32)
    full = dense.matmul(x, w)
    for rows in range(2, 8):
        np.testing.assert_array_equal(dense.matmul(np.ascontiguousarray(x[:rows]), w), full[:rows])
