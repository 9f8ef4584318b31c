"""Restricted API groups and TLS (issue 21), on HTTP and gRPC with the real clients: a restricted group
refuses calls without its header (401 / UNAUTHENTICATED) or with a wrong value (403 / PERMISSION_DENIED)
and serves those with it; the other groups stay open; a self-signed certificate serves both wires."""

import ssl

import httpx
import numpy as np
import pytest

from cellserve.models import RNN
from cellserve.server.app import create_app
from cellserve.server.auth import parse_restriction
from cellserve.server.background import BackgroundServer
from cellserve.server.repository import ModelConfig, Repository, serve_model

tritonclient = pytest.importorskip("tritonclient.grpc")
MODEL = RNN.random("sru", 8, 16, num_layers=1, seed=5)


def repository():
    return Repository([serve_model("stream", MODEL, ModelConfig(block_steps=2))])


def frames_input():
    chunk = tritonclient.InferInput("frames", [2, 8], "FP32")
    chunk.set_data_from_numpy(np.ones((2, 8), np.float32))
    return chunk


def test_restricted_groups_on_both_wires(grpc_frontend):
    restricted = (parse_restriction("model-repository,statistics:admin-key=s3cret"),
                  parse_restriction("inference:infer-key=go"))
    app = create_app(repository(), grpc_port=0, restricted=restricted, model_control="explicit")
    body = {"inputs": [{"name": "frames", "shape": [2, 8], "datatype": "FP32", "data": [1.0] * 16}]}
    with BackgroundServer(app) as server:
        url = server.url
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200  # health stays open
        assert httpx.get(f"{url}/v2/models/stream").status_code == 200  # metadata too
        assert httpx.post(f"{url}/v2/repository/index").status_code == 401
        assert httpx.post(f"{url}/v2/repository/index", headers={"admin-key": "wrong"}).status_code == 403
        assert httpx.post(f"{url}/v2/repository/index", headers={"Admin-Key": "s3cret"}).status_code == 200
        assert httpx.get(f"{url}/v2/models/stream/stats").status_code == 401
        assert httpx.get(f"{url}/metrics").status_code == 401
        reply = httpx.post(f"{url}/v2/models/stream/infer", json=body)
        assert reply.status_code == 401 and "infer-key" in reply.json()["error"]
        assert httpx.post(f"{url}/v2/models/stream/infer", json=body, headers={"infer-key": "go"}).status_code == 200
        client = tritonclient.InferenceServerClient(f"127.0.0.1:{app.state.grpc_port}")
        assert client.is_server_live()
        with pytest.raises(tritonclient.InferenceServerException, match="UNAUTHENTICATED|infer-key"):
            client.infer("stream", [frames_input()])
        with pytest.raises(tritonclient.InferenceServerException, match="PERMISSION_DENIED|does not allow"):
            client.infer("stream", [frames_input()], headers={"infer-key": "stop"})
        result = client.infer("stream", [frames_input()], headers={"infer-key": "go"})
        assert result.as_numpy("outputs").shape == (2, 16)
        with pytest.raises(tritonclient.InferenceServerException, match="UNAUTHENTICATED|admin-key"):
            client.get_model_repository_index()
        assert len(client.get_model_repository_index(headers={"admin-key": "s3cret"}).models) == 1
        client.close()


def test_parse_restriction_names_what_is_wrong():
    for text, message in (("inference", "GROUPS:HEADER=VALUE"), ("nope:k=v", "unknown API group"),
                          ("inference:k=", "GROUPS:HEADER=VALUE")):
        with pytest.raises(ValueError, match=message):
            parse_restriction(text)


def test_tls_on_http_and_grpc_with_the_real_clients(certificate, grpc_frontend):
    import tritonclient.http as httpclient

    cert, key = certificate
    app = create_app(repository(), grpc_port=0, tls={"certfile": cert, "keyfile": key})
    with BackgroundServer(app, ssl_certfile=cert, ssl_keyfile=key) as server:
        context = ssl.create_default_context(cafile=cert)
        http = httpclient.InferenceServerClient(f"localhost:{server.port}", ssl=True,
                                                ssl_context_factory=lambda: context)
        assert http.is_server_ready()
        chunk = httpclient.InferInput("frames", [2, 8], "FP32")
        chunk.set_data_from_numpy(np.ones((2, 8), np.float32))
        assert http.infer("stream", [chunk]).as_numpy("outputs").shape == (2, 16)
        http.close()
        with pytest.raises(httpx.HTTPError):  # plain HTTP to the TLS port does not get through
            httpx.get(f"http://127.0.0.1:{server.port}/v2/health/ready", timeout=5)
        grpc = tritonclient.InferenceServerClient(f"localhost:{app.state.grpc_port}", ssl=True,
                                                  root_certificates=cert)
        assert grpc.infer("stream", [frames_input()]).as_numpy("outputs").shape == (2, 16)
        grpc.close()
