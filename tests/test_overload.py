"""Sessions are never cut by load (issue 21): streams that send their chunks without waiting, far past the
queue's size, get every chunk answered in order, and each session's outputs equal its unbatched run; a new
request past the queue is refused (it loses nothing); a session whose chunk fails refuses every later chunk,
naming the failed one, and is never continued past the gap."""

import queue
import threading

import numpy as np
import pytest

from cellserve.engine import Engine, EngineFull
from cellserve.engine.request import SessionError
from cellserve.families import make_runner
from cellserve.models import RNN
from cellserve.server.app import create_app
from cellserve.server.background import BackgroundServer
from cellserve.server.repository import ModelConfig, Repository, serve_model

tritonclient = pytest.importorskip("tritonclient.grpc")

MODEL = RNN.random("sru", 8, 16, num_layers=2, seed=3)
STREAMS, CHUNKS, FRAMES = 8, 300, 4


def unpaced_streams(grpc_port: int, model: str, frames: np.ndarray, frames_per_chunk: int = FRAMES,
                    input_name: str = "frames", output_name: str = "outputs"):
    """Each of len(frames) sessions opens with its first chunk, then (once every session is open) sends the
    rest on its own gRPC stream without waiting for answers, as a live audio client does; returns (outputs per
    session in chunk order, errors). (Load may refuse a session's first chunk: one stream starting late,
    behind the others' floods, was refused so under a loaded test run.)"""
    streams, chunks = len(frames), frames.shape[1] // frames_per_chunk
    outputs, errors = [dict() for _ in range(streams)], []
    opened = threading.Barrier(streams, timeout=300)

    def stream(s):
        client = tritonclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        answers: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))

        def answered():
            result, error = answers.get(timeout=300)
            if error is not None:
                errors.append(str(error))
            else:
                outputs[s][int(result.get_response().id)] = result.as_numpy(output_name)

        for k in range(chunks):
            chunk = tritonclient.InferInput(input_name, [frames_per_chunk, frames.shape[2]], "FP32")
            chunk.set_data_from_numpy(frames[s, k * frames_per_chunk:(k + 1) * frames_per_chunk])
            client.async_stream_infer(model, [chunk], sequence_id=f"s{s}", sequence_start=k == 0,
                                      sequence_end=k == chunks - 1, request_id=str(k))
            if k == 0:
                answered()
                opened.wait()
        for _ in range(chunks - 1):
            answered()
        client.stop_stream()
        client.close()

    threads = [threading.Thread(target=stream, args=(s,)) for s in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return [np.concatenate([o[k] for k in range(chunks)]) if len(o) == chunks else None for o in outputs], errors


def test_unpaced_grpc_streams_past_the_queue_lose_no_chunk(grpc_frontend):
    repository = Repository([serve_model("stream", MODEL, ModelConfig(block_steps=4, max_queue=32, max_batch=8))])
    app = create_app(repository, grpc_port=0)
    frames = np.random.default_rng(0).standard_normal((STREAMS, CHUNKS * FRAMES, 8)).astype(np.float32)
    with BackgroundServer(app):
        outputs, errors = unpaced_streams(app.state.grpc_port, "stream", frames)
    assert errors == []
    for s in range(STREAMS):
        np.testing.assert_allclose(outputs[s], MODEL.forward(frames[s][:, None])[0][:, 0], rtol=1e-4, atol=1e-5)


def test_the_queue_refuses_new_work_but_takes_chunks_of_open_sessions():
    # not started: nothing drains (on the Python loop; the native one admits on the submitting thread)
    engine = Engine(make_runner(MODEL, 64, step_loop="python"), "cellular", max_batch=4, max_queue=2)
    engine._running_flag = True  # accept submissions without a scheduler thread
    frames = np.zeros((4, 8), np.float32)
    first = engine.submit({"frames": frames}, sequence_id="a", sequence_start=True)
    engine.submit({"frames": frames})
    with pytest.raises(EngineFull):
        engine.submit({"frames": frames})  # a new request: refused, nothing is lost
    with pytest.raises(EngineFull):
        engine.submit({"frames": frames}, sequence_id="b", sequence_start=True)  # a new session: likewise
    later = [engine.submit({"frames": frames}, sequence_id="a") for _ in range(5)]  # open session: all taken
    assert engine.queue_depth == 7 and not first.done() and not any(f.done() for f in later)
    engine.stop(drain=False, timeout=1)


@pytest.mark.parametrize("step_loop", ["native", "python"])
def test_a_failed_chunk_stops_its_session_and_names_itself(step_loop):
    engine = Engine(make_runner(MODEL, 64, step_loop=step_loop), "cellular", max_batch=4).start()
    assert engine.step_loop == step_loop
    try:
        good = np.ones((4, 8), np.float32)
        engine.submit({"frames": good}, sequence_id="x", sequence_start=True).result(10)
        engine.submit({"frames": good}, sequence_id="x").result(10)
        original = engine.runner._chunk  # the runner fails the session's chunk 2 at admission

        def broken(req):
            if req.session is not None and req.chunk == 2:
                raise RuntimeError("disk on fire")
            return original(req)

        engine.runner._chunk = broken
        third = engine.submit({"frames": good}, sequence_id="x")
        with pytest.raises(RuntimeError, match="disk on fire"):
            third.result(10)
        with pytest.raises(SessionError, match="chunk 2, which failed"):
            engine.submit({"frames": good}, sequence_id="x")
        engine.runner._chunk = original
        restarted = engine.submit({"frames": good}, sequence_id="x", sequence_start=True).result(10)
        assert restarted["outputs"].shape == (4, 16)
    finally:
        engine.stop()


def test_repository_control_is_off_by_default_and_names_are_checked(tmp_path):
    """Triton's --model-control-mode: load and unload are refused unless explicit; a path-like name never
    reaches the filesystem, is never listed, and no error shows a server path."""
    import httpx

    from cellserve import models

    (tmp_path / "stream").mkdir()
    models.save(MODEL, tmp_path / "stream" / "model.safetensors")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    for mode in ("none", "explicit"):
        repository = Repository.from_directory(tmp_path, only=["stream"])
        app = create_app(repository, grpc_port=0, model_control=mode)
        with BackgroundServer(app) as server:
            client = tritonclient.InferenceServerClient(f"127.0.0.1:{app.state.grpc_port}")
            if mode == "none":
                reply = httpx.post(f"{server.url}/v2/repository/models/stream/unload")
                assert reply.status_code == 403 and "--model-control-mode explicit" in reply.json()["error"]
                with pytest.raises(Exception, match="PERMISSION_DENIED|model control is off"):
                    client.load_model("stream")
                continue
            for name in ("..", ".", "a%2Fb", "..%2F..%2Fetc"):
                reply = httpx.post(f"{server.url}/v2/repository/models/{name}/load")
                assert reply.status_code in (400, 404), (name, reply.text)
                assert str(tmp_path) not in reply.text
            with pytest.raises(Exception, match="invalid model name"):
                client.load_model("..")
            broken = httpx.post(f"{server.url}/v2/repository/models/broken/load")
            assert broken.status_code == 400 and str(tmp_path) not in broken.text and "broken" in broken.text
            index = httpx.post(f"{server.url}/v2/repository/index").json()
            assert {m["name"] for m in index} == {"stream", "broken"}
            assert all(str(tmp_path) not in m["reason"] for m in index)
            assert httpx.post(f"{server.url}/v2/repository/models/stream/unload").status_code == 200
            client.close()


def test_sigterm_drains_and_exits_zero():
    """`cellserve serve` on SIGTERM: readiness false, accepted requests answered, exit status 0."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "cellserve.cli", "serve", "--port", str(port), "--grpc-port", "0",
                               "--log-level", "warning"],  # its output is read only at the end
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        body = {"inputs": [{"name": "text", "shape": [64], "datatype": "BYTES", "data": [str(n) for n in range(64)]}]}
        statuses, refused, dropped = [], [], []

        def ask():  # requests back to back until the server stops taking them
            with httpx.Client(timeout=60) as client:
                for _ in range(200):
                    try:
                        reply = client.post(f"{url}/v2/models/speller/infer", json=body)
                    except httpx.ConnectError:  # never accepted: the listener had closed
                        refused.append(1)
                        return
                    except httpx.HTTPError as exc:  # accepted, then dropped: lost
                        dropped.append(repr(exc))
                        return
                    statuses.append(reply.status_code)
                    if reply.status_code != 200:
                        return

        threads = [threading.Thread(target=ask) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        server.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert server.wait(60) == 0, server.stdout.read()
        # every request the server accepted was answered (a dropped connection would have raised here)
        assert dropped == [] and statuses.count(200) > 10 and set(statuses) <= {200, 503}
    finally:
        if server.poll() is None:
            server.kill()


def test_the_stream_waits_at_the_pending_bound_and_nothing_is_refused():
    """max_pending_chunks 4: a stream of 100 unpaced chunks is read no faster than its session drains."""
    repository = Repository([serve_model("stream", MODEL, ModelConfig(block_steps=4, max_pending_chunks=4,
                                                                        max_queue=8))])
    app = create_app(repository, grpc_port=0)
    assert app.state.backend.pending_limit("stream") == 4
    frames = np.random.default_rng(3).standard_normal((2, 100 * FRAMES, 8)).astype(np.float32)
    with BackgroundServer(app):
        outputs, errors = unpaced_streams(app.state.grpc_port, "stream", frames)
    assert errors == []
    for s in range(2):
        np.testing.assert_allclose(outputs[s], MODEL.forward(frames[s][:, None])[0][:, 0], rtol=1e-4, atol=1e-5)
