"""Silero VAD as its wheel ships it (the `silero-vad` test dependency; nothing is downloaded): every ONNX file
imports (If on `sr`, constants, primitive-op cells, packed and split state), and served with the state held
by the server and the 64-sample context kept per session, 8 concurrent streams of 40 chunks over HTTP and
gRPC give the speech probabilities ONNX Runtime gives on the original file with state and context threaded
by hand."""

import concurrent.futures
import json
import pathlib

import httpx
import numpy as np
import onnx
import pytest

silero_vad = pytest.importorskip("silero_vad")
pytest.importorskip("onnxruntime")

from cellserve.cells.onnxruntime import ort_session  # noqa: E402
from cellserve.interop.onnx_import import import_onnx  # noqa: E402
from cellserve.server.app import create_app  # noqa: E402
from cellserve.server.background import BackgroundServer  # noqa: E402
from cellserve.server.repository import Repository  # noqa: E402
from conftest import GRPC_FRONTENDS  # noqa: E402

DATA = pathlib.Path(silero_vad.__file__).parent / "data"
CHUNK = {16000: 512, 8000: 256}
CONTEXT = {16000: 64, 8000: 32}
# file, sample rate, how its state is passed, batch exported
FILES = [("silero_vad.onnx", 16000), ("silero_vad.onnx", 8000), ("silero_vad_16k_op15.onnx", 16000),
         ("silero_vad_half.onnx", 16000), ("silero_vad_openvino_16k.onnx", 16000),
         ("silero_vad_op18_ifless.onnx", 16000)]
STREAMS, CHUNKS = 8, 40


def has_sr(graph: onnx.ModelProto) -> bool:
    return any(i.name == "sr" for i in graph.graph.input)


def config(name: str, sr: int) -> dict:
    graph = onnx.load(DATA / name)
    batch = 1 if "openvino" in name else -1
    return {"controls": {"sr": sr} if has_sr(graph) else {}, "context": {"input": CONTEXT[sr]},
            "input_shapes": {"input": [batch, CHUNK[sr] + CONTEXT[sr]]}, "max_batch": 16}


def audio(seed: int, sr: int) -> np.ndarray:
    """A stream of CHUNKS chunks: noise with bursts of a voiced-like tone, so probabilities move."""
    rng = np.random.default_rng(seed)
    n = CHUNKS * CHUNK[sr]
    t = np.arange(n) / sr
    tone = 0.3 * np.sin(2 * np.pi * (140 + 40 * seed) * t) * (np.sin(2 * np.pi * 0.7 * t) > 0)
    return (tone + 0.02 * rng.standard_normal(n)).astype(np.float32)


def reference(name: str, sr: int, samples: np.ndarray) -> np.ndarray:
    """ONNX Runtime on the original file, state and context threaded by hand (as silero's wrapper does)."""
    graph = onnx.load(DATA / name)
    session = ort_session(graph)
    state, context = np.zeros((2, 1, 128), np.float32), np.zeros((1, CONTEXT[sr]), np.float32)
    probs = []
    for chunk in samples.reshape(CHUNKS, 1, CHUNK[sr]):
        x = np.concatenate([context, chunk], axis=1)
        feeds = {"input": x, "state": state}
        if has_sr(graph):
            feeds["sr"] = np.array(sr, np.int64)
        out, state = session.run(None, feeds)
        context = x[:, -CONTEXT[sr]:]
        probs.append(float(out[0, 0]))
    return np.array(probs)


@pytest.fixture(scope="module", params=GRPC_FRONTENDS)
def server(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("silero")
    for i, (name, sr) in enumerate(FILES):
        folder = root / f"vad{i}"
        (folder / "1").mkdir(parents=True)
        (folder / "1" / "model.onnx").write_bytes((DATA / name).read_bytes())
        (folder / "config.json").write_text(json.dumps(config(name, sr)))
    app = create_app(Repository.from_directory(root), grpc_port=0, grpc_frontend=request.param)
    with BackgroundServer(app) as server:
        server.grpc_port, server.app = app.state.grpc_port, app
        yield server


def http_stream(url: str, model: str, sid: str, samples: np.ndarray, sr: int) -> list[float]:
    probs = []
    with httpx.Client(timeout=60) as client:
        for k, chunk in enumerate(samples.reshape(CHUNKS, 1, CHUNK[sr])):
            body = {"inputs": [{"name": "input", "shape": [1, CHUNK[sr]], "datatype": "FP32",
                                "data": chunk.reshape(-1).tolist()}],
                    "parameters": {"sequence_id": sid, "sequence_start": k == 0, "sequence_end": k == CHUNKS - 1}}
            reply = client.post(f"{url}/v2/models/{model}/infer", json=body)
            assert reply.status_code == 200, reply.text
            outputs = {o["name"]: o for o in reply.json()["outputs"]}
            assert set(outputs) == {"output"}  # the state the server holds is not returned
            probs.append(outputs["output"]["data"][0])
    return probs


@pytest.mark.parametrize("index", range(len(FILES)), ids=[f"{n}@{sr}" for n, sr in FILES])
def test_sessions_over_http_equal_onnxruntime_with_state_threaded(server, index):
    name, sr = FILES[index]
    streams = [audio(s, sr) for s in range(STREAMS)]
    with concurrent.futures.ThreadPoolExecutor(STREAMS) as pool:
        got = list(pool.map(lambda s: http_stream(server.url, f"vad{index}", f"h{index}-{s}", streams[s], sr),
                            range(STREAMS)))
    for s in range(STREAMS):
        np.testing.assert_allclose(got[s], reference(name, sr, streams[s]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("index", [0, 1, 5], ids=["silero_vad.onnx@16000", "silero_vad.onnx@8000", "ifless"])
def test_sessions_over_grpc_streaming_equal_onnxruntime(server, index):
    import queue

    grpcclient = pytest.importorskip("tritonclient.grpc")
    name, sr = FILES[index]
    streams = [audio(10 + s, sr) for s in range(STREAMS)]
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for k in range(CHUNKS):  # the 8 sessions interleaved on one stream, sent without waiting
            for s in range(STREAMS):
                chunk = grpcclient.InferInput("input", [1, CHUNK[sr]], "FP32")
                chunk.set_data_from_numpy(streams[s][k * CHUNK[sr]:(k + 1) * CHUNK[sr]].reshape(1, -1))
                client.async_stream_infer(f"vad{index}", [chunk], sequence_id=f"g{index}-{s}", sequence_start=k == 0,
                                          sequence_end=k == CHUNKS - 1, request_id=f"{s}:{k}")
        got = np.zeros((STREAMS, CHUNKS))
        for _ in range(STREAMS * CHUNKS):
            result, error = results.get(timeout=60)
            assert error is None, error
            s, k = map(int, result.get_response().id.split(":"))
            got[s, k] = result.as_numpy("output")[0, 0]
    finally:
        client.stop_stream()
    for s in range(STREAMS):
        np.testing.assert_allclose(got[s], reference(name, sr, streams[s]), rtol=1e-4, atol=1e-5)


def test_a_client_holding_the_state_itself_batches_and_gets_it_back(server):
    """No sequence_id: the request carries `state` and gets `stateN`; a stream threaded that way by the
    client gives ONNX Runtime's probabilities (its context is zeros: the server keeps context only in
    sessions, so this client sends chunks that hold their own context)."""
    name, sr = FILES[0]
    graph = onnx.load(DATA / name)
    session = ort_session(graph)
    samples = audio(3, sr).reshape(CHUNKS, 1, CHUNK[sr])
    ours, theirs = np.zeros((2, 1, 128), np.float32), np.zeros((2, 1, 128), np.float32)
    with httpx.Client(timeout=60) as client:
        for chunk in samples[:10]:
            body = {"inputs": [{"name": "input", "shape": [1, CHUNK[sr]], "datatype": "FP32",
                                "data": chunk.reshape(-1).tolist()},
                               {"name": "state", "shape": [2, 1, 128], "datatype": "FP32",
                                "data": ours.reshape(-1).tolist()}]}
            reply = client.post(f"{server.url}/v2/models/vad0/infer", json=body)
            assert reply.status_code == 200, reply.text
            outputs = {o["name"]: np.array(o["data"], np.float32).reshape(o["shape"]) for o in reply.json()["outputs"]}
            ours = outputs["stateN"]
            x = np.concatenate([np.zeros((1, CONTEXT[sr]), np.float32), chunk], axis=1)
            want, theirs = session.run(None, {"input": x, "state": theirs, "sr": np.array(sr, np.int64)})
            np.testing.assert_allclose(outputs["output"], want, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_the_sequence_file_threads_h_and_c_as_sessions(server):
    """silero_vad_16k_sequence.onnx takes a whole sequence of windows with h and c: imported, its state
    pairs are found by dataflow (h -> hn, c -> cn), and two halves threaded give the whole."""
    model = import_onnx(DATA / "silero_vad_16k_sequence.onnx")
    assert {(p["input"], p["output"]) for p in model.state_pairs} == {("h", "hn"), ("c", "cn")}
    rng = np.random.default_rng(0)
    windows = (rng.standard_normal((12, 576)) * 0.1).astype(np.float32)
    zero = np.zeros((1, 1, 128), np.float32)
    session = ort_session(onnx.load(DATA / "silero_vad_16k_sequence.onnx"))
    want = session.run(None, {"input": windows, "h": zero, "c": zero})[0]
    first = model.forward({"input": windows[:5], "h": zero, "c": zero})
    second = model.forward({"input": windows[5:], "h": first["hn"], "c": first["cn"]})
    np.testing.assert_allclose(np.concatenate([first["speech_probs"], second["speech_probs"]]), want,
                               rtol=1e-4, atol=1e-5)


def test_a_session_request_carries_several_chunks_in_order(server):
    """A 96 ms message as one request: its rows are consecutive chunks of the stream, run in order; the
    probabilities equal chunk-by-chunk ONNX Runtime."""
    name, sr = FILES[0]
    samples = audio(5, sr)
    want = reference(name, sr, samples)
    per = 3
    got = []
    with httpx.Client(timeout=60) as client:
        for m in range(CHUNKS // per):
            rows = samples[m * per * CHUNK[sr]:(m + 1) * per * CHUNK[sr]].reshape(per, CHUNK[sr])
            body = {"inputs": [{"name": "input", "shape": [per, CHUNK[sr]], "datatype": "FP32",
                                "data": rows.reshape(-1).tolist()}],
                    "parameters": {"sequence_id": "multi", "sequence_start": m == 0}}
            reply = client.post(f"{server.url}/v2/models/vad0/infer", json=body)
            assert reply.status_code == 200, reply.text
            output = reply.json()["outputs"][0]
            assert output["shape"] == [per, 1]
            got += output["data"]
    np.testing.assert_allclose(got, want[:len(got)], rtol=1e-4, atol=1e-5)


def test_speech_segments_equal_silero_vads_own(server):
    """tests/data/speech_16k.wav (two sentences spoken by espeak-ng, 1.2 s apart): the speech segments from
    the probabilities cellserve serves equal those silero_vad's get_speech_timestamps finds with its own
    ONNX wrapper."""
    import wave

    torch = pytest.importorskip("torch")
    from silero_vad import get_speech_timestamps, get_speech_timestamps_from_probs, load_silero_vad

    with wave.open(str(pathlib.Path(__file__).parent / "data" / "speech_16k.wav")) as w:
        assert w.getframerate() == 16000
        samples = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
    chunk, per = CHUNK[16000], 10
    padded = np.pad(samples, (0, -len(samples) % (chunk * per)))
    probs = []
    with httpx.Client(timeout=60) as client:
        for m, rows in enumerate(padded.reshape(-1, per, chunk)):
            body = {"inputs": [{"name": "input", "shape": [per, chunk], "datatype": "FP32",
                                "data": rows.reshape(-1).tolist()}],
                    "parameters": {"sequence_id": "speech", "sequence_start": m == 0}}
            reply = client.post(f"{server.url}/v2/models/vad0/infer", json=body)
            assert reply.status_code == 200, reply.text
            probs += reply.json()["outputs"][0]["data"]
    probs = probs[: -(-len(samples) // chunk)]
    ours = get_speech_timestamps_from_probs(probs, sampling_rate=16000, audio_length_samples=len(samples))
    theirs = get_speech_timestamps(torch.from_numpy(samples), load_silero_vad(onnx=True), sampling_rate=16000)
    assert len(theirs) >= 2  # the two sentences
    assert ours == theirs


def test_the_torchscript_file_imports_through_its_stateless_submodule(tmp_path, capsys):
    """silero_vad.jit's forward(x, sr) keeps state in the module: binding sr is not enough, and the error
    says so; its submodule _model takes the state as an input and imports like the ONNX files."""
    from cellserve.cli import main

    jit = DATA / "silero_vad.jit"
    out = tmp_path / "vad.safetensors"
    assert main(["import-torch", str(jit), str(out), "--arg", "sr=16000"]) == 2
    assert "keeps state in the module" in capsys.readouterr().err
    code = main(["import-torch", str(jit), str(out), "--submodule", "_model", "--input", "input:float32:batch,576",
                 "--input", "state:float32:2,batch,128"])
    assert code == 0
    from cellserve import models

    model = models.load(out)
    assert model.state_pairs[0]["input"] == "state"
    samples = audio(7, 16000)
    zero = np.zeros((2, 1, 128), np.float32)
    state, context, probs = zero, np.zeros((1, 64), np.float32), []
    for chunk in samples.reshape(CHUNKS, 1, 512)[:10]:
        x = np.concatenate([context, chunk], axis=1)
        out_ = model.forward({"input": x, "state": state})
        state, context = out_[model.state_pairs[0]["output"]], x[:, -64:]
        probs.append(float(out_["output0"].reshape(-1)[0]))
    np.testing.assert_allclose(probs, reference("silero_vad.onnx", 16000, samples)[:10], rtol=1e-4, atol=1e-5)


def test_a_session_snapshot_restores_state_and_context_elsewhere(server):
    """Snapshot mid-stream (state and the 64-sample context), restore it as another session: the rest of
    the stream gives what one uninterrupted stream gives."""
    name, sr = FILES[0]
    samples = audio(9, sr).reshape(CHUNKS, 1, CHUNK[sr])
    want = reference(name, sr, samples.reshape(-1))

    def send(client, sid, chunk, **parameters):
        body = {"inputs": [{"name": "input", "shape": [1, CHUNK[sr]], "datatype": "FP32",
                            "data": chunk.reshape(-1).tolist()}], "parameters": {"sequence_id": sid, **parameters}}
        body["inputs"] += parameters.pop("extra", [])
        reply = client.post(f"{server.url}/v2/models/vad0/infer", json=body)
        assert reply.status_code == 200, reply.text
        return {o["name"]: o["data"] for o in reply.json()["outputs"]}

    with httpx.Client(timeout=60) as client:
        got = [send(client, "first", samples[k], sequence_start=k == 0)["output"][0] for k in range(9)]
        snap = send(client, "first", samples[9], sequence_snapshot=True, sequence_end=True)
        got.append(snap["output"][0])
        blob = {"name": "sequence_snapshot", "shape": [1], "datatype": "BYTES", "data": snap["sequence_snapshot"]}
        for k in range(10, 20):
            parameters = {"sequence_restore": True, "extra": [blob]} if k == 10 else {}
            got.append(send(client, "second", samples[k], **parameters)["output"][0])
    np.testing.assert_allclose(got, want[:20], rtol=1e-4, atol=1e-5)


def test_config_pbtxt_declares_the_state_pair_and_the_specialization(tmp_path):
    """Triton's layout: config.pbtxt's sequence_batching.state pairs the state tensors by name, and the
    controls, shapes and context come as parameters."""
    folder = tmp_path / "vad"
    (folder / "1").mkdir(parents=True)
    (folder / "1" / "model.onnx").write_bytes((DATA / "silero_vad.onnx").read_bytes())
    (folder / "config.pbtxt").write_text('''
max_batch_size: 64
input [ { name: "input" data_type: TYPE_FP32 dims: [ 512 ] } ]
output [ { name: "output" data_type: TYPE_FP32 dims: [ 1 ] } ]
sequence_batching {
  max_sequence_idle_microseconds: 5000000
  state [ { input_name: "state" output_name: "stateN" data_type: TYPE_FP32 dims: [ 2, -1, 128 ] } ]
}
parameters { key: "controls" value { string_value: "{\\"sr\\": 16000}" } }
parameters { key: "input_shapes" value { string_value: "{\\"input\\": [-1, 576]}" } }
parameters { key: "context" value { string_value: "{\\"input\\": 64}" } }
''')
    from cellserve.server.repository import load_folder

    served = load_folder(folder)
    assert served.stateful and served.config.state == {"state": "stateN"}
    assert served.model.state_pairs == [{"input": "state", "output": "stateN"}]
    assert served.config.idle_timeout_s == 5.0
    samples = audio(4, 16000)
    served.engine.start()
    try:
        got = [float(served.engine.submit({"input": chunk}, sequence_id="s", sequence_start=k == 0).result(30)
                     ["output"].reshape(-1)[0]) for k, chunk in enumerate(samples.reshape(CHUNKS, 1, 512)[:8])]
    finally:
        served.engine.stop()
    np.testing.assert_allclose(got, reference("silero_vad.onnx", 16000, samples)[:8], rtol=1e-4, atol=1e-5)


def test_a_message_of_several_chunks_equals_its_chunks_sent_one_by_one(server):
    """A session message of N chunks is one engine request of N steps (the native loop keeps each chunk's
    state); its answers are those of the N chunks sent one per message, byte for byte, and ONNX
    Runtime's; a snapshot after its last message holds the same state and context."""
    grpcclient = pytest.importorskip("tritonclient.grpc")
    name, sr = FILES[0]
    samples = audio(21, sr)
    rows = samples.reshape(CHUNKS, CHUNK[sr])
    sizes = [3, 1, 5, 2, 9, 20]  # chunks per message, CHUNKS in all
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")

    def send(sid, chunks, start, last):
        x = grpcclient.InferInput("input", [len(chunks), CHUNK[sr]], "FP32")
        x.set_data_from_numpy(np.ascontiguousarray(chunks))
        answer = client.infer("vad0", [x], sequence_id=sid, sequence_start=start, sequence_end=last,
                              parameters={"sequence_snapshot": last})
        return answer.as_numpy("output"), answer.as_numpy("sequence_snapshot") if last else None

    def requests_counted():  # (through the statistics API, which takes in what native lanes have answered)
        stats = httpx.get(f"{server.url}/v2/models/vad0/stats").json()["model_stats"][0]
        return int(stats["inference_stats"]["success"]["count"])

    merged, at, before = [], 0, requests_counted()
    for i, n in enumerate(sizes):
        merged.append(send("merged", rows[at:at + n], i == 0, i == len(sizes) - 1))
        at += n
    assert requests_counted() - before == len(sizes)  # one engine request per message
    single = [send("single", rows[k:k + 1], k == 0, k == CHUNKS - 1) for k in range(CHUNKS)]
    client.close()
    got, expected = np.concatenate([m[0] for m in merged]), np.concatenate([m[0] for m in single])
    assert got.shape == (CHUNKS, 1) and got.tobytes() == expected.tobytes()
    np.testing.assert_allclose(got[:, 0], reference(name, sr, samples), rtol=1e-4, atol=1e-5)
    assert merged[-1][1][0] == single[-1][1][0]  # the snapshots


def test_the_packaged_preset_serves_silero_vad_by_name_with_its_config():
    """`cellserve serve silero-vad`: the silero-vad package's graph, configured (sample rate, chunk, context),
    whose sessions equal ONNX Runtime with state and context threaded by hand."""
    from cellserve.server.main import repository_for

    repository = repository_for("silero-vad", settings={"max_batch": 8})
    served = repository.models["silero-vad"]
    assert served.config.context == {"input": 64} and served.config.max_batch == 8 and served.stateful
    samples = audio(3, 16000)
    with BackgroundServer(create_app(repository)) as server:
        got = http_stream(server.url, "silero-vad", "preset", samples, 16000)
    np.testing.assert_allclose(got, reference("silero_vad.onnx", 16000, samples), rtol=1e-4, atol=1e-5)
