"""WebSocket streams (server/websocket.py) with the `websockets` client over Silero VAD on
tests/data/speech_16k.wav: binary chunks in, probabilities out, equal to ONNX Runtime with state and context
threaded by hand; connections keep their sessions apart; a bad message leaves the rest of its session
correct; JSON messages ride the same session; closing the connection ends its session."""

import json
import pathlib
import threading
import time
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
        background.repository = repository
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


def test_the_native_front_end_holds_the_session_in_its_lane(server, audio):
    """On the native HTTP front end a Silero connection is served by the model's stream lane (no Python per
    binary message): the lane holds its session while it is open, and not after it closes."""
    if server.frontend != "native":
        pytest.skip("the Python front end's sessions live in the engine")
    samples, _ = audio
    served = server.repository.get("silero-vad")
    with connect(server.ws + "?sequence_id=held-natively") as ws:
        probabilities(ws, samples[: 2 * CHUNK])
        assert served.lane_sessions() == 1 and served.engine.sessions == 0
    for _ in range(100):  # (the server sees the close a moment later)
        if served.lane_sessions() == 0:
            break
        time.sleep(0.02)
    assert served.lane_sessions() == 0


def _text_answers(frontend: str, samples: np.ndarray) -> list:
    """The same session of text (JSON) and binary messages on one front end: every answer as it came."""
    repository = repository_for("silero-vad", settings={"max_pending_chunks": 4})
    chunk = lambda i: samples[i * CHUNK:(i + 1) * CHUNK].tolist()  # noqa: E731
    messages = [
        {"id": "a", "inputs": [{"name": "input", "shape": [1, CHUNK], "datatype": "FP32", "data": chunk(0)}]},
        {"inputs": [{"name": "input", "shape": [2, CHUNK], "datatype": "FP32", "data": chunk(1) + chunk(2)}],
         "outputs": [{"name": "output", "parameters": {"binary_data": True}}]},
        samples[3 * CHUNK:5 * CHUNK].tobytes(),
        {"inputs": [{"name": "input", "shape": [1, CHUNK], "datatype": "FP32", "data": chunk(5)}],
         "parameters": {"binary_data_output": True}},
        {"inputs": [{"name": "input", "shape": [1, 7], "datatype": "FP32", "data": [0.0] * 7}]},  # wrong shape
        {"inputs": [{"name": "input", "shape": [1, CHUNK], "datatype": "INT64", "data": [0] * CHUNK}]},
        b"\x00" * (CHUNK * 4 + 2),
        np.full(CHUNK, np.nan, np.float32).tobytes(),
        "[1, 2]",
        {"id": "z", "inputs": [{"name": "input", "shape": [1, CHUNK], "datatype": "FP32", "data": chunk(7)}]},
        {"inputs": [{"name": "input", "shape": [1, CHUNK], "datatype": "FP32", "data": chunk(8)}],
         "outputs": [{"name": "nope"}]},  # (last: the Python front end refuses it after its step, not before)
    ]
    with BackgroundServer(create_app(repository), frontend=frontend) as background:
        url = background.url.replace("http://", "ws://") + "/v2/models/silero-vad/stream?sequence_id=same"
        with connect(url) as ws:
            answers = []
            for message in messages:
                ws.send(json.dumps(message) if isinstance(message, dict) else message)
                answers.append(ws.recv(timeout=30))
    return answers


@pytest.mark.skipif(HTTP_FRONTENDS == ["python"], reason="built without the native HTTP front end")
def test_native_and_python_sessions_answer_alike_byte_for_byte(audio):
    """Text messages (JSON tensors, binary outputs, errors) and binary ones on a native session get the
    Python front end's answers: the same bytes, text or binary alike (probabilities within float rounding of
    the batch: compared at rtol 1e-5 where they are numbers)."""
    samples, _ = audio
    native, python = _text_answers("native", samples), _text_answers("python", samples)
    assert len(native) == len(python)
    for got, want in zip(native, python):
        assert type(got) is type(want), (got, want)
        if isinstance(want, str):
            g, w = json.loads(got), json.loads(want)
            if "error" in w:
                assert got == want
            for out_g, out_w in zip(g.get("outputs", []), w.get("outputs", [])):
                np.testing.assert_allclose(out_g.pop("data", []), out_w.pop("data", []), rtol=1e-5, atol=1e-6)
            assert g == w
            continue
        assert len(got) == len(want)
        if want.startswith(b"{"):  # the binary extension: a JSON header, then the values
            (head_w, end), (head_g, _) = (json.JSONDecoder().raw_decode(x.decode("latin-1")) for x in (want, got))
            assert head_g == head_w and got[:end] == want[:end]
            got, want = got[end:], want[end:]
        np.testing.assert_allclose(np.frombuffer(got, np.float32), np.frombuffer(want, np.float32), rtol=1e-5,
                                   atol=1e-6)


def test_a_message_over_the_limit_is_refused_and_the_session_goes_on(audio):
    samples, want = audio
    for frontend in HTTP_FRONTENDS:
        repository = repository_for("silero-vad")
        with BackgroundServer(create_app(repository, max_body_bytes=8 * CHUNK * 4), frontend=frontend) as background:
            url = background.url.replace("http://", "ws://") + "/v2/models/silero-vad/stream"
            with connect(url) as ws:
                got = probabilities(ws, samples[: 2 * CHUNK])
                ws.send(samples[: 9 * CHUNK].tobytes())
                assert json.loads(ws.recv(timeout=30)) == {"error": f"message exceeds the limit of {8 * CHUNK * 4} bytes"}
                got += probabilities(ws, samples[2 * CHUNK: 4 * CHUNK])
        np.testing.assert_allclose(got, want[:4], rtol=1e-4, atol=1e-5)


def _frame(opcode: int, payload: bytes, rng) -> bytes:
    """A client's WebSocket frame (masked, as RFC 6455 requires of clients)."""
    key = bytes(rng.randrange(256) for _ in range(4))
    size = len(payload)
    head = bytes([0x80 | opcode])
    head += bytes([0x80 | size]) if size < 126 else bytes([0x80 | 126]) + size.to_bytes(2, "big") if size < 65536 \
        else bytes([0x80 | 127]) + size.to_bytes(8, "big")
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


@pytest.mark.skipif(HTTP_FRONTENDS == ["python"], reason="built without the native HTTP front end")
def test_fuzzed_upgrades_and_frames_for_a_bounded_time_leave_a_well_formed_session_correct(audio):
    """Mutated upgrade requests and frames (bad opcodes, lengths, masks, payloads, cut connections) against
    the native WebSocket sessions for a bounded time, while a well-formed session gets ONNX Runtime's
    probabilities throughout."""
    import random
    import socket

    samples, want = audio
    rng = random.Random(5)
    repository = repository_for("silero-vad", settings={"max_pending_chunks": 4})
    chunk = samples[:CHUNK]
    payloads = [(2, chunk.tobytes()), (2, samples[: 3 * CHUNK].tobytes()), (2, b"\x00\x01"), (1, b"{not json"),
                (1, json.dumps({"inputs": [{"name": "input", "shape": [1, CHUNK], "datatype": "FP32",
                                            "data": chunk.tolist()}]}).encode()),
                (9, b"ping"), (8, b"\x03\xe8"), (0, b"continued"), (3, b"reserved opcode")]
    stop, errors = threading.Event(), []
    with BackgroundServer(create_app(repository, max_body_bytes=1 << 16), frontend="native") as server:
        url = server.url.replace("http://", "ws://") + "/v2/models/silero-vad/stream"

        def well_formed():
            rounds = 0
            while not stop.is_set() or rounds == 0:
                try:
                    with connect(url) as ws:
                        got = probabilities(ws, samples[: 24 * CHUNK])
                    np.testing.assert_allclose(got, want[:24], rtol=1e-4, atol=1e-5)
                except Exception as exc:  # noqa: BLE001
                    errors.append(exc)
                rounds += 1

        checker = threading.Thread(target=well_formed)
        checker.start()
        deadline, sent = time.time() + 6, 0
        while time.time() < deadline:
            upgrade = bytearray((f"GET /v2/models/silero-vad/stream?sequence_id=fuzz-{sent} HTTP/1.1\r\n"
                                 f"Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                                 "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                                 ).encode())
            if rng.random() < 0.2:
                upgrade[rng.randrange(len(upgrade))] = rng.randrange(256)
            frames = bytearray()
            for _ in range(rng.randint(1, 6)):
                opcode, payload = rng.choice(payloads)
                frame = bytearray(_frame(opcode, payload, rng))
                for _ in range(rng.randint(0, 3)):
                    frame[rng.randrange(len(frame))] = rng.randrange(256)
                frames += frame
            if rng.random() < 0.3:
                frames = frames[: rng.randrange(len(frames) + 1)]  # cut short
            try:
                with socket.create_connection(("127.0.0.1", server.port), timeout=2) as raw:
                    raw.sendall(bytes(upgrade))
                    raw.recv(4096)
                    raw.sendall(bytes(frames))
                    raw.settimeout(0.2)
                    while raw.recv(65536):
                        pass
            except OSError:
                pass
            sent += 1
        stop.set()
        checker.join(120)
        assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
        with connect(url) as ws:  # and a new session after it all
            np.testing.assert_allclose(probabilities(ws, samples[: 4 * CHUNK]), want[:4], rtol=1e-4, atol=1e-5)
    assert sent > 50 and not errors


def test_a_snapshot_taken_on_the_websocket_restores_over_http(server, audio):
    """A text message with sequence_snapshot returns the session's snapshot (the native session's as the
    Python one's); restored over HTTP under another sequence_id, it goes on exactly as the WebSocket does."""
    samples, want = audio
    chunk = lambda i: samples[i * CHUNK:(i + 1) * CHUNK]  # noqa: E731
    with connect(server.ws + "?sequence_id=to-snapshot") as ws:
        probabilities(ws, samples[: 5 * CHUNK])
        ws.send(json.dumps({"inputs": [{"name": "input", "shape": [1, CHUNK], "datatype": "FP32",
                                        "data": chunk(5).tolist()}], "parameters": {"sequence_snapshot": True}}))
        answer = json.loads(ws.recv(timeout=30))
        (blob,) = next(o["data"] for o in answer["outputs"] if o["name"] == "sequence_snapshot")
        going_on = probabilities(ws, samples[6 * CHUNK: 8 * CHUNK])
    body = {"inputs": [{"name": "input", "shape": [1, CHUNK], "datatype": "FP32", "data": chunk(6).tolist()},
                       {"name": "sequence_snapshot", "shape": [1], "datatype": "BYTES", "data": [blob]}],
            "parameters": {"sequence_id": "restored", "sequence_restore": True}}
    reply = httpx.post(f"{server.url}/v2/models/silero-vad/infer", json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    restored = reply.json()["outputs"][0]["data"][0]
    np.testing.assert_allclose([restored], going_on[:1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(going_on, want[6:8], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(HTTP_FRONTENDS == ["python"], reason="built without the native HTTP front end")
def test_grpc_continues_snapshots_and_restores_a_websockets_session(audio):
    """One server on both native wires: a ModelInfer naming the sequence_id of a session a WebSocket holds (in
    the lanes both wires share) runs its chunk in that session and returns the snapshot; the WebSocket goes
    on from it, and the snapshot restored under another id gives the same next probability."""
    grpc = pytest.importorskip("grpc")
    from tritonclient.grpc import service_pb2 as pb

    samples, want = audio
    chunk = lambda i: samples[i * CHUNK:(i + 1) * CHUNK].reshape(1, CHUNK)  # noqa: E731

    def infer(channel, x, sid, snapshot=None, **flags):
        message = pb.ModelInferRequest(model_name="silero-vad")
        message.inputs.add(name="input", datatype="FP32", shape=[1, CHUNK])
        message.raw_input_contents.append(x.tobytes())
        if snapshot is not None:  # (raw BYTES: the length prefix the snapshot output carries)
            message.inputs.add(name="sequence_snapshot", datatype="BYTES", shape=[1])
            message.raw_input_contents.append(snapshot)
        message.parameters["sequence_id"].string_param = sid
        for key, value in flags.items():
            message.parameters[key].bool_param = value
        return pb.ModelInferResponse.FromString(channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer")(message.SerializeToString(), timeout=30))

    app = create_app(repository_for("silero-vad", settings={"max_pending_chunks": 4}), grpc_port=0,
                     grpc_frontend="native")
    with BackgroundServer(app, frontend="native") as background, \
            grpc.insecure_channel(f"127.0.0.1:{app.state.grpc_port}") as channel:
        url = background.url.replace("http://", "ws://") + "/v2/models/silero-vad/stream?sequence_id=shared"
        with connect(url) as ws:
            before = probabilities(ws, samples[: 5 * CHUNK])
            served = app.state.backend.repository.get("silero-vad")
            assert served.lane_sessions() == 1 and served.engine.sessions == 0  # the lane holds it, not Python
            answer = infer(channel, chunk(5), "shared", sequence_snapshot=True)
            names = [o.name for o in answer.outputs]
            on_grpc = np.frombuffer(answer.raw_output_contents[0], np.float32)[0]
            blob = answer.raw_output_contents[names.index("sequence_snapshot")]
            going_on = probabilities(ws, samples[6 * CHUNK: 8 * CHUNK])
        restored = infer(channel, chunk(6), "copy", snapshot=blob, sequence_restore=True)
    np.testing.assert_allclose(before, want[:5], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose([on_grpc], want[5:6], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(going_on, want[6:8], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.frombuffer(restored.raw_output_contents[0], np.float32)[:1], going_on[:1],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("frontend", HTTP_FRONTENDS)
def test_a_session_over_tls_gives_the_same_probabilities(certificate, audio, frontend):
    """wss:// on the TLS port: the native front end's sessions run over its TLS stream as over TCP.

    The client is websockets' asyncio one. Its sync client reads an SSL socket in one thread while it writes
    the socket in another, which OpenSSL does not allow (python/cpython#137583, python-socketio#1568), and
    with it three full test runs lost the opening handshake: no answer in 10 s, with either front end."""
    import asyncio
    import ssl

    from websockets.asyncio.client import connect as connect_async

    cert, key = certificate
    samples, want = audio
    repository = repository_for("silero-vad")

    async def session(url: str) -> list[float]:
        out = []
        async with connect_async(url, ssl=ssl.create_default_context(cafile=cert), open_timeout=30) as ws:
            assert ws.response.headers["X-Sequence-Id"] == "over-tls"
            for chunk in samples[: 6 * CHUNK].reshape(-1, CHUNK):
                await ws.send(chunk.tobytes())
                out.append(float(np.frombuffer(await asyncio.wait_for(ws.recv(), 30), np.float32)[0]))
            if frontend == "native":
                assert repository.get("silero-vad").lane_sessions() == 1
        return out

    with BackgroundServer(create_app(repository), frontend=frontend, ssl_certfile=cert, ssl_keyfile=key) as server:
        got = asyncio.run(session(f"wss://localhost:{server.port}/v2/models/silero-vad/stream?sequence_id=over-tls"))
    np.testing.assert_allclose(got, want[:6], rtol=1e-4, atol=1e-5)
