"""WebSocket streams (server/websocket.py) with the `websockets` client over Silero VAD on
tests/data/speech_16k.wav: binary chunks in, probabilities out, equal to ONNX Runtime with state and context
threaded by hand; connections keep their sessions apart; a bad message leaves the rest of its session
correct; JSON messages ride the same session; closing the connection ends its session."""

import json
import pathlib
import threading
import wave

import httpx
import numpy as np
import pytest

silero_vad = pytest.importorskip("silero_vad")
ort = pytest.importorskip("onnxruntime")
from websockets.exceptions import ConnectionClosed  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from cellserve.server.app import create_app  # noqa: E402
from cellserve.server.background import BackgroundServer  # noqa: E402
from conftest import HTTP_FRONTENDS  # noqa: E402
from cellserve.server.main import repository_for  # noqa: E402

SILERO = pathlib.Path(silero_vad.__file__).parent / "data" / "silero_vad.onnx"
CHUNK, CONTEXT = 512, 64


def speech() -> np.ndarray:
    with wave.open(str(pathlib.Path(__file__).parent / "data" / "speech_16k.wav")) as f:
        assert f.getframerate() == 16000 and f.getsampwidth() == 2
        pcm = np.frombuffer(f.readframes(f.getnframes()), np.int16)
    samples = (pcm.astype(np.float32) / 32768.0)
    return samples[: len(samples) // CHUNK * CHUNK]


def reference(samples: np.ndarray) -> np.ndarray:
    """ONNX Runtime on the file, state and context threaded by hand (as silero-vad's wrapper does)."""
    session = ort.InferenceSession(str(SILERO), providers=["CPUExecutionProvider"])
    state, context, out = np.zeros((2, 1, 128), np.float32), np.zeros((1, CONTEXT), np.float32), []
    for chunk in samples.reshape(-1, 1, CHUNK):
        x = np.concatenate([context, chunk], axis=1)
        prob, state = session.run(None, {"input": x, "state": state, "sr": np.array(16000, np.int64)})
        context = x[:, -CONTEXT:]
        out.append(float(prob[0, 0]))
    return np.array(out, np.float32)


@pytest.fixture(scope="module", params=HTTP_FRONTENDS)
def server(request):
    """Each test on each HTTP front end (the native one passes the upgrade and the frames to the app)."""
    repository = repository_for("silero-vad", settings={"max_pending_chunks": 4})
    with BackgroundServer(create_app(repository), frontend=request.param) as background:
        background.ws = background.url.replace("http://", "ws://") + "/v2/models/silero-vad/stream"
        yield background


@pytest.fixture(scope="module")
def audio():
    samples = speech()
    return samples, reference(samples)


def probabilities(ws, samples: np.ndarray) -> list[float]:
    out = []
    for chunk in samples.reshape(-1, CHUNK):
        ws.send(chunk.tobytes())
        out.append(float(np.frombuffer(ws.recv(timeout=30), np.float32)[0]))
    return out


def test_binary_chunks_give_onnxruntimes_probabilities_and_the_session_is_named(server, audio):
    samples, want = audio
    with connect(server.ws + "?sequence_id=mine") as ws:
        assert ws.response.headers["X-Sequence-Id"] == "mine"
        got = probabilities(ws, samples)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert max(got) > 0.5 > min(got)  # (speech and silence both: the file exercises the model)
    with connect(server.ws) as ws:  # unnamed: the server names it
        assert len(ws.response.headers["X-Sequence-Id"]) >= 16


def test_sixteen_connections_keep_their_sessions_apart(server, audio):
    samples, _ = audio
    parts = [np.roll(samples, 37 * CHUNK * i)[: 40 * CHUNK] for i in range(16)]
    got, errors = [None] * 16, []

    def client(i):
        try:
            with connect(server.ws) as ws:
                got[i] = probabilities(ws, parts[i])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    for i in range(16):
        np.testing.assert_allclose(got[i], reference(parts[i]), rtol=1e-4, atol=1e-5)


def test_a_bad_message_in_the_middle_leaves_the_rest_of_the_session_correct(server, audio):
    samples, want = audio
    chunks = samples[: 20 * CHUNK].reshape(-1, CHUNK)
    with connect(server.ws) as ws:
        got = probabilities(ws, chunks[:10].reshape(-1))
        ws.send(chunks[10].tobytes()[:-4])  # not whole rows
        assert "binary message holds whole rows" in json.loads(ws.recv(timeout=30))["error"]
        ws.send("{not json")
        assert "error" in json.loads(ws.recv(timeout=30))
        body = {"inputs": [{"name": "input", "shape": [1, CHUNK], "datatype": "FP32",
                            "data": chunks[10].tolist()}]}
        ws.send(json.dumps(body))  # a JSON request rides the same session
        answer = json.loads(ws.recv(timeout=30))
        got.append(answer["outputs"][0]["data"][0])
        got += probabilities(ws, chunks[11:].reshape(-1))
    np.testing.assert_allclose(got, want[:20], rtol=1e-4, atol=1e-5)


def test_messages_sent_ahead_of_their_answers_come_back_in_order(server, audio):
    samples, want = audio
    chunks = samples[: 40 * CHUNK].reshape(-1, CHUNK)  # ten times max_pending_chunks (4): the server reads on
    with connect(server.ws) as ws:                     # as answers go out
        for chunk in chunks:
            ws.send(chunk.tobytes())
        got = [float(np.frombuffer(ws.recv(timeout=30), np.float32)[0]) for _ in chunks]
        ws.send(chunks[:3].reshape(-1).tobytes())  # one message of three chunks: three probabilities
        three = np.frombuffer(ws.recv(timeout=30), np.float32)
    np.testing.assert_allclose(got, want[:40], rtol=1e-4, atol=1e-5)
    assert three.shape == (3,)


def test_closing_the_connection_ends_its_session(server, audio):
    samples, _ = audio
    with connect(server.ws + "?sequence_id=short-lived") as ws:
        probabilities(ws, samples[: 3 * CHUNK])
    body = {"inputs": [{"name": "input", "shape": [1, CHUNK], "datatype": "FP32", "data": [0.0] * CHUNK}],
            "parameters": {"sequence_id": "short-lived"}}
    for _ in range(50):  # (the server sees the close a moment later)
        reply = httpx.post(f"{server.url}/v2/models/silero-vad/infer", json=body)
        if reply.status_code == 400:
            break
    assert reply.status_code == 400 and "WebSocket closed" in reply.json()["error"]


def test_an_unknown_model_or_input_is_refused_with_a_message(server):
    for url in (server.ws.replace("silero-vad", "nope"), server.ws + "?input=nope"):
        with connect(url) as ws:
            assert "error" in json.loads(ws.recv(timeout=30))
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=30)
            assert closed.value.rcvd.code == 1008


def test_bench_streams_drives_the_websocket_deployment_and_writes_its_row(tmp_path):
    from cellserve.bench import streams

    out = tmp_path / "streams.json"
    result = streams.run(message_ms=(96,), streams=(4,), deployments=("cellular-ws",), seconds=1.0, idle_sessions=0,
                         json_path=out)
    (row,) = result["rows"]
    assert row["deployment"] == "cellular-ws" and row["sustained"] and row["lost"] == 0 and row["refused"] == 0
    assert row["client_cpu_us_per_message"] > 0 and row["server_cpu_us_per_message"] > 0
    assert json.loads(out.read_text())["rows"][0]["streams"] == 4


def test_each_message_gets_an_access_line(server, audio, caplog):
    samples, _ = audio
    with caplog.at_level("INFO", logger="cellserve.access"), connect(server.ws) as ws:
        probabilities(ws, samples[: 2 * CHUNK])
        ws.send(b"\x00\x01")
        json.loads(ws.recv(timeout=30))
    lines = [r.getMessage() for r in caplog.records if r.name == "cellserve.access" and " websocket " in r.getMessage()]
    assert len(lines) == 3 and sum("status=200" in line for line in lines) == 2 and "status=400" in lines[-1]
