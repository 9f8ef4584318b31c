import numpy as np
import pytest
import torch

torch.set_num_threads(1)


def assert_close(ours, ref, rtol=1e-4, atol=1e-5):
    """fp32 agreement with a torch reference (relative 1e-4; a small absolute floor for values near 0)."""
    if hasattr(ref, "detach"):
        ref = ref.detach().numpy()
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=rtol, atol=atol)


from cellserve.server.native.grpc_front import AVAILABLE as NATIVE_GRPC, _grpc_front  # noqa: E402

GRPC_FRONTENDS = ["native", "python"] if NATIVE_GRPC else ["python"]
NATIVE_HTTP = bool(_grpc_front is not None and getattr(_grpc_front, "HTTP", 0))
HTTP_FRONTENDS = ["native", "python"] if NATIVE_HTTP else ["python"]


@pytest.fixture(params=GRPC_FRONTENDS)
def grpc_frontend(request, monkeypatch):
    """Runs a test once per gRPC front end this build has (the servers it starts pick it up), with the HTTP
    front end of the same kind where the build has it."""
    monkeypatch.setenv("CELLSERVE_GRPC_FRONTEND", request.param)
    if request.param == "python" or NATIVE_HTTP:
        monkeypatch.setenv("CELLSERVE_HTTP_FRONTEND", request.param)
    return request.param


@pytest.fixture(params=HTTP_FRONTENDS)
def http_frontend(request, monkeypatch):
    """Runs a test once per HTTP front end this build has (BackgroundServer picks it up)."""
    monkeypatch.setenv("CELLSERVE_HTTP_FRONTEND", request.param)
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
