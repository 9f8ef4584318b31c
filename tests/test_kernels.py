import numpy as np
import pytest

from cellserve.kernels import dense


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 31, 32, 33, 70])
def test_matmul_every_path_matches_numpy(rows, rng):
    """Each batch size takes its own path (GEMV, the Numba kernel, GEMM); all compute x @ W^T."""
    w = rng.standard_normal((49, 37)).astype(np.float32)
    x = rng.standard_normal((rows, 37)).astype(np.float32)
    np.testing.assert_allclose(dense.matmul(x, w), x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-4, atol=1e-4)


def test_fast_tanh_and_sigmoid_are_accurate_over_fp32_range():
    from numba import njit

    from cellserve.kernels.pointwise import sigmoid, tanh

    @njit
    def both(x, t, s):
        for i in range(x.shape[0]):
            t[i] = tanh(x[i])
            s[i] = sigmoid(x[i])

    x = np.linspace(-40, 40, 400_001).astype(np.float32)
    t, s = np.empty_like(x), np.empty_like(x)
    both(x, t, s)
    x64 = x.astype(np.float64)
    assert np.abs(t - np.tanh(x64)).max() < 1e-6
    assert np.abs(s - 1 / (1 + np.exp(-x64))).max() < 1e-6
    assert t.max() <= 1 and t.min() >= -1 and s.min() >= 0 and s.max() <= 1
