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


@pytest.fixture(scope="session")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 and localhost: (cert.pem, key.pem)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return str(folder / "cert.pem"), str(folder / "key.pem")
