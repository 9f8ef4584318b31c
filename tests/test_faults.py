"""Fault and abuse cases against one running server (issue 21). After each, a normal request is served and an
open session goes on with nothing lost: a tensor over the size limit on both wires, 500 idle TCP
connections, clients that disconnect mid-request and mid-stream, and 32 unpaced gRPC streams at the default
settings (outputs equal their unbatched runs, memory bounded). Fuzzed bodies and path-like names are in
test_server.py, test_grpc.py and test_overload.py; SIGTERM under load in test_overload.py."""

import os
import queue
import socket
import time

import httpx
import numpy as np
import pytest

from cellserve.models import RNN
from cellserve.server.app import create_app
from cellserve.server.background import BackgroundServer
from cellserve.server.repository import ModelConfig, Repository, serve_model
from conftest import GRPC_FRONTENDS  # noqa: E402

tritonclient = pytest.importorskip("tritonclient.grpc")
MODEL = RNN.random("sru", 8, 16, num_layers=2, seed=11)
SESSION_FRAMES = np.random.default_rng(5).standard_normal((40, 8)).astype(np.float32)


@pytest.fixture(scope="module", params=GRPC_FRONTENDS)
def server(request):
    app = create_app(Repository([serve_model("stream", MODEL, ModelConfig(block_steps=4))]), grpc_port=0,
                     grpc_frontend=request.param)
    with BackgroundServer(app) as background:
        background.grpc_port = app.state.grpc_port
        background.session = iter(range(10))  # chunks of the session that runs through every case
        yield background
        background.closing = True


def chunk_body(frames, **parameters):
    return {"inputs": [{"name": "frames", "shape": list(frames.shape), "datatype": "FP32",
                        "data": frames.reshape(-1).tolist()}], "parameters": parameters}


def still_serving(server):
    """A normal request, and the next chunk of the session that spans all cases (its outputs checked at the
    end of the module)."""
    reply = httpx.post(f"{server.url}/v2/models/stream/infer", json=chunk_body(SESSION_FRAMES[:4]), timeout=30)
    assert reply.status_code == 200, reply.text
    k = next(server.session)
    reply = httpx.post(f"{server.url}/v2/models/stream/infer", timeout=30, json=chunk_body(
        SESSION_FRAMES[4 * k:4 * k + 4], sequence_id="survivor", sequence_start=k == 0))
    assert reply.status_code == 200, reply.text
    server.outputs = getattr(server, "outputs", []) + [np.array(reply.json()["outputs"][0]["data"])]


def test_a_tensor_over_the_limit_on_both_wires(server):
    still_serving(server)
    big = b"x" * (17 * 2**20)  # over HTTP's 16 MB body limit
    reply = httpx.post(f"{server.url}/v2/models/stream/infer", content=big, timeout=60)
    assert reply.status_code == 413 and "limit" in reply.json()["error"]
    client = tritonclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    frames = tritonclient.InferInput("frames", [2**21 + 1, 8], "FP32")  # 64 MB + 32 bytes
    frames.set_data_from_numpy(np.zeros((2**21 + 1, 8), np.float32))
    with pytest.raises(tritonclient.InferenceServerException, match="RESOURCE_EXHAUSTED|larger than max"):
        client.infer("stream", [frames])
    client.close()
    still_serving(server)


def test_five_hundred_idle_connections(server):
    sockets = []
    try:
        for _ in range(500):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sockets.append(s)
        still_serving(server)
    finally:
        for s in sockets:
            s.close()
    still_serving(server)


def test_clients_that_go_away_mid_request_and_mid_stream(server):
    # mid-request: half a body, then the connection closes
    s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    s.sendall(b"POST /v2/models/stream/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100000\r\n\r\n{\"inputs\": [")
    s.close()
    # mid-stream: a session's chunks sent, the stream cancelled before its answers
    client = tritonclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for k in range(20):
        frames = tritonclient.InferInput("frames", [4, 8], "FP32")
        frames.set_data_from_numpy(np.ones((4, 8), np.float32))
        client.async_stream_infer("stream", [frames], sequence_id="gone", sequence_start=k == 0)
    client.stop_stream(cancel_requests=True)
    client.close()
    time.sleep(0.5)
    still_serving(server)


def test_thirty_two_unpaced_streams_at_the_default_settings(server):
    """32 streams x 300 chunks sent without waiting: no error inside an open session, every session's
    outputs equal its unbatched run, and the server's memory stays bounded."""
    from test_overload import unpaced_streams

    frames = np.random.default_rng(1).standard_normal((32, 300 * 4, 8)).astype(np.float32)

    def rss() -> int:
        with open(f"/proc/{os.getpid()}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    before = rss()
    outputs, errors = unpaced_streams(server.grpc_port, "stream", frames)
    assert errors == []
    for s, got in enumerate(outputs):
        np.testing.assert_allclose(got, MODEL.forward(frames[s][:, None])[0][:, 0], rtol=1e-4, atol=1e-5)
    # server and clients share this process: the growth bound covers both (flow control keeps at most 64
    # chunks per session in the server; the answers all sit in the clients' queues)
    assert rss() - before < 512 * 2**20
    still_serving(server)


def test_the_session_that_ran_through_every_case_equals_its_unbatched_run(server):
    still_serving(server)
    got = np.concatenate([o.reshape(-1, 16) for o in server.outputs])
    want = MODEL.forward(SESSION_FRAMES[:4 * len(server.outputs), None])[0][:, 0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
