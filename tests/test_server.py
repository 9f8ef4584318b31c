"""The HTTP server: Open Inference Protocol conformance (plain HTTP and tritonclient), streaming sessions,
bad input answered with 4xx while everything else keeps working, metrics, graceful shutdown."""

import json
import os
import threading
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings, strategies as st

from cellserve.models import LanguageModel, RNN, Seq2Seq, TreeLSTM
from cellserve.models.lm import log_softmax
from cellserve.server.app import create_app
from cellserve.server.background import BackgroundServer
from cellserve.server.repository import ModelConfig, Repository, serve_model
from conftest import HTTP_FRONTENDS

VOCAB = 30
LM = LanguageModel.random(VOCAB, 8, 12, num_layers=2, seed=1)
S2S = Seq2Seq.random(VOCAB, VOCAB, 8, 12, seed=2)
TREE = TreeLSTM.random(VOCAB, 8, 12, num_classes=3, seed=3)
STREAM = RNN.random("sru", 6, 10, num_layers=2, seed=4)


def make_repository(idle_timeout_s=60.0):
    return Repository([serve_model("lm", LM, ModelConfig()), serve_model("s2s", S2S, ModelConfig()),
                       serve_model("tree", TREE, ModelConfig()),
                       serve_model("stream", STREAM, ModelConfig(block_steps=3, idle_timeout_s=idle_timeout_s))])


@pytest.fixture(scope="module", params=HTTP_FRONTENDS)
def client(request):
    """The app in process (Starlette's TestClient: the Python front end), and where the build has it behind the
    native HTTP front end over a socket (the models with a token lane answered natively, the rest passed on)."""
    app = create_app(make_repository(), max_body_bytes=2**20)
    if request.param == "python":
        with TestClient(app) as c:
            yield c
        return
    with BackgroundServer(app, frontend="native") as server, httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def tensor(name, array, datatype):
    array = np.asarray(array)
    return {"name": name, "shape": list(array.shape), "datatype": datatype, "data": array.reshape(-1).tolist()}


def infer(client, model, inputs, parameters=None, **extra):
    body = {"inputs": inputs, **extra}
    if parameters:
        body["parameters"] = parameters
    return client.post(f"/v2/models/{model}/infer", json=body)


def lm_reference(tokens):
    logp = log_softmax(LM.forward(np.asarray(tokens)[:, None])[:, 0])
    return float(logp[np.arange(len(tokens) - 1), tokens[1:]].sum()), int(logp[-1].argmax())


def test_server_and_model_metadata(client):
    assert client.get("/v2").json()["name"] == "cellserve"
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    meta = client.get("/v2/models/lm").json()
    assert meta["name"] == "lm" and meta["versions"] == ["1"]
    assert [i["name"] for i in meta["inputs"]] == ["tokens"]
    assert client.get("/v2/models/lm/ready").status_code == 200
    assert client.get("/v2/models/lm/versions/1").status_code == 200
    missing = client.get("/v2/models/nope")
    assert missing.status_code == 404 and "unknown model" in missing.json()["error"]


def test_lm_infer_batch_matches_model(client):
    tokens = np.random.default_rng(0).integers(0, VOCAB, (3, 7))
    res = infer(client, "lm", [tensor("tokens", tokens, "INT64")], id="req-1")
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["model_name"] == "lm" and body["id"] == "req-1"
    out = {o["name"]: o for o in body["outputs"]}
    assert out["log_likelihood"]["datatype"] == "FP64" and out["log_likelihood"]["shape"] == [3]
    for row, ll, nxt in zip(tokens, out["log_likelihood"]["data"], out["next_token"]["data"]):
        ref_ll, ref_next = lm_reference(row)
        assert ll == pytest.approx(ref_ll, rel=1e-5) and nxt == ref_next


def test_the_documented_infer_route_answers_as_the_direct_path():
    """App.__call__ answers inference straight from the ASGI scope; FastAPI's own route (in /docs, and what a
    host that rewrites paths reaches) gives the same bodies, errors included."""
    from fastapi import FastAPI

    app = create_app(make_repository(), max_body_bytes=2**16)
    body = {"inputs": [tensor("tokens", np.arange(6)[None], "INT64")], "id": "x"}  # one row: the same steps

    async def through_fastapi(scope, receive, send):
        await FastAPI.__call__(app, scope, receive, send)

    with TestClient(app) as direct, TestClient(through_fastapi) as routed:
        for path, payload in (("/v2/models/lm/infer", body), ("/v2/models/lm/versions/1/infer", body),
                              ("/v2/models/nope/infer", body), ("/v2/models/lm/infer", {"inputs": []}),
                              ("/v2/models/lm/infer", {"inputs": [tensor("tokens", [1] * 40000, "INT64")]})):
            a, b = direct.post(path, json=payload), routed.post(path, json=payload)
            assert (a.status_code, a.json()) == (b.status_code, b.json()), path
            assert a.status_code == 200 or "error" in a.json()
    assert a.status_code == 413


def test_seq2seq_and_tree_infer(client):
    src = [3, 4, 5, 6]
    res = infer(client, "s2s", [tensor("tokens", [src], "INT64"), tensor("max_output_tokens", [6], "INT64")])
    assert res.status_code == 200, res.text
    out = {o["name"]: o for o in res.json()["outputs"]}
    want = S2S.translate(np.array(src), 6)
    assert out["tokens"]["data"][:len(want)] == want and out["lengths"]["data"] == [len(want)]
    parents, tokens = [2, 2, -1], [1, 2, 3]
    res = infer(client, "tree", [tensor("tokens", tokens, "INT64"), tensor("parents", parents, "INT64")])
    assert res.status_code == 200, res.text
    np.testing.assert_allclose(res.json()["outputs"][0]["data"], TREE.forward(tokens, parents), rtol=1e-5)


def test_streaming_session_over_http(client):
    frames = np.random.default_rng(1).standard_normal((11, 6)).astype(np.float32)
    outputs, cuts = [], [0, 4, 5, 9, 11]
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        params = {"sequence_id": 77, "sequence_start": i == 0, "sequence_end": b == 11}
        res = infer(client, "stream", [tensor("frames", frames[a:b], "FP32")], params)
        assert res.status_code == 200, res.text
        body = res.json()
        assert body["parameters"]["sequence_id"] == "77"
        assert body["parameters"]["frames_pending"] == (0 if b == 11 else b % 3)
        out = body["outputs"][0]
        outputs.append(np.array(out["data"], np.float32).reshape(out["shape"]))
    ys, _ = STREAM.forward(frames[:, None])
    np.testing.assert_allclose(np.concatenate(outputs), ys[:, 0], rtol=1e-5, atol=1e-6)
    res = infer(client, "stream", [tensor("frames", frames[:2], "FP32")], {"sequence_id": 77})
    assert res.status_code == 400 and "sequence_start" in res.json()["error"]


def test_expired_session_gets_clear_400():
    with TestClient(create_app(make_repository(idle_timeout_s=0.2))) as c:
        frames = [tensor("frames", np.zeros((3, 6)), "FP32")]
        assert infer(c, "stream", frames, {"sequence_id": "s", "sequence_start": True}).status_code == 200
        time.sleep(1.0)
        res = infer(c, "stream", frames, {"sequence_id": "s"})
        assert res.status_code == 400 and "expired" in res.json()["error"]


BAD_REQUESTS = [
    ("lm", b"{not json", "not valid JSON"),
    ("lm", {"inputs": []}, "non-empty list"),
    ("lm", {"inputs": [{"name": "tokens", "shape": [2], "datatype": "INT64", "data": [1, 2, 3]}]}, "needs 2 elements"),
    ("lm", {"inputs": [{"name": "tokens", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}]}, "integer tensor"),
    ("lm", {"inputs": [{"name": "tokens", "shape": [2], "datatype": "INT64", "data": [1, VOCAB]}]}, "token ids"),
    ("lm", {"inputs": [{"name": "tokens", "shape": [2], "datatype": "INT64", "data": ["a", "b"]}]}, "numbers"),
    ("lm", {"inputs": [{"name": "tokens", "shape": [1, 1, 1], "datatype": "INT64", "data": [1]}]}, "shape"),
    ("lm", {"inputs": [{"name": "words", "shape": [1], "datatype": "INT64", "data": [1]}]}, "unknown input"),
    ("lm", {"inputs": [{"name": "tokens", "shape": [1], "datatype": "INT128", "data": [1]}]}, "unknown datatype"),
    ("lm", {"inputs": [{"name": "tokens", "shape": [2], "datatype": "INT64", "data": [1, 2]}],
            "parameters": {"sequence_id": 5}}, "stateless"),
    ("lm", {"inputs": [{"name": "tokens", "shape": [2], "datatype": "INT64", "data": [1, 2]}],
            "outputs": [{"name": "nope"}]}, "unknown output"),
    ("stream", {"inputs": [{"name": "frames", "shape": [1, 6], "datatype": "FP32",
                            "data": [float("nan")] + [0.0] * 5}]}, "NaN"),
    ("stream", {"inputs": [{"name": "frames", "shape": [2, 5], "datatype": "FP32", "data": [0.0] * 10}]}, "shape"),
    ("stream", {"inputs": [{"name": "frames", "shape": [1, 6], "datatype": "FP32", "data": [0.0] * 6}],
                "parameters": {"sequence_id": True}}, "sequence_id"),
    ("tree", {"inputs": [{"name": "tokens", "shape": [2], "datatype": "INT64", "data": [1, 2]},
                         {"name": "parents", "shape": [2], "datatype": "INT64", "data": [1, 0]}]}, "root"),
]


@pytest.mark.parametrize("model,body,message", BAD_REQUESTS)
def test_bad_input_gets_400_naming_the_problem(client, model, body, message):
    kwargs = {"content": body} if isinstance(body, bytes) else {"content": json.dumps(body).replace(
        "NaN", "NaN")}
    res = client.post(f"/v2/models/{model}/infer", headers={"content-type": "application/json"}, **kwargs)
    assert res.status_code == 400, res.text
    assert message.lower() in res.json()["error"].lower()


def test_huge_payload_gets_413(client):
    res = client.post("/v2/models/lm/infer", content=b"x" * (2**20 + 10))
    assert res.status_code == 413 and "limit" in res.json()["error"]


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
                           | st.text(max_size=5), lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.text(max_size=5), kids, max_size=4), max_leaves=12)
tensor_specs = st.fixed_dictionaries({
    "name": st.sampled_from(["tokens", "frames", "parents", "text", "x"]),
    "shape": st.lists(st.integers(-1, 7), max_size=3),
    "datatype": st.sampled_from(["INT64", "INT32", "FP32", "FP64", "BYTES", "BOOL", "UINT8", "nope"]),
    "data": st.lists(st.integers(-5, 40) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=3),
                     max_size=16),
}, optional={"parameters": st.dictionaries(st.sampled_from(["binary_data_size", "x"]), json_values, max_size=1)})
bodies = st.fixed_dictionaries({"inputs": st.lists(tensor_specs, max_size=3)}, optional={
    "parameters": st.dictionaries(st.sampled_from(["sequence_id", "sequence_start", "sequence_end", "binary_data_output"]),
                                  json_values, max_size=3),
    "outputs": json_values, "id": json_values})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["lm", "s2s", "tree", "stream"]), bodies | json_values)
def test_fuzzed_requests_never_break_the_server(client, model, body):
    res = client.post(f"/v2/models/{model}/infer", content=json.dumps(body, allow_nan=True))
    assert res.status_code < 500, res.text
    if res.status_code >= 400:
        assert res.json()["error"]


def test_open_session_and_other_requests_survive_bad_traffic(client):
    frames = np.random.default_rng(2).standard_normal((6, 6)).astype(np.float32)
    first = infer(client, "stream", [tensor("frames", frames[:3], "FP32")], {"sequence_id": "keep", "sequence_start": True})
    assert first.status_code == 200
    for model, body, _ in BAD_REQUESTS:
        content = body if isinstance(body, bytes) else json.dumps(body)
        assert client.post(f"/v2/models/{model}/infer", content=content).status_code == 400
    second = infer(client, "stream", [tensor("frames", frames[3:], "FP32")], {"sequence_id": "keep", "sequence_end": True})
    assert second.status_code == 200
    got = np.concatenate([np.array(r.json()["outputs"][0]["data"]).reshape(-1, 10) for r in (first, second)])
    np.testing.assert_allclose(got, STREAM.forward(frames[:, None])[0][:, 0], rtol=1e-5, atol=1e-6)
    assert infer(client, "lm", [tensor("tokens", [1, 2, 3], "INT64")]).status_code == 200


def test_metrics_expose_requests_latency_batches_sessions_and_pool(client):
    infer(client, "lm", [tensor("tokens", [[1, 2, 3], [4, 5, 6]], "INT64")])
    infer(client, "stream", [tensor("frames", np.zeros((3, 6)), "FP32")], {"sequence_id": "m", "sequence_start": True})
    text = client.get("/metrics").text
    assert 'cellserve_requests_total{model="lm",outcome="success"}' in text
    assert 'cellserve_request_latency_seconds_count{model="lm"}' in text
    assert 'cellserve_queue_time_seconds_bucket' in text
    assert 'cellserve_batch_size_bucket{cell_type="lm"' in text
    assert 'cellserve_active_sessions{model="stream"} 1.0' in text
    assert 'cellserve_state_pool_used_slots{model="stream"} 1.0' in text
    assert 'outcome="http_400"' in text


def test_tritonclient_http_works_unchanged(http_frontend):
    tritonclient = pytest.importorskip("tritonclient.http")
    with BackgroundServer(create_app(make_repository())) as server:
        client = tritonclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("lm")
        assert client.get_model_metadata("lm")["name"] == "lm"
        tokens = np.random.default_rng(3).integers(0, VOCAB, (2, 5)).astype(np.int64)
        for binary in (True, False):  # the binary tensor extension (default) and plain JSON
            inp = tritonclient.InferInput("tokens", list(tokens.shape), "INT64")
            inp.set_data_from_numpy(tokens, binary_data=binary)
            outs = [tritonclient.InferRequestedOutput(n, binary_data=binary) for n in ("log_likelihood", "next_token")]
            result = client.infer("lm", [inp], outputs=outs)
            for row, ll in zip(tokens, result.as_numpy("log_likelihood")):
                assert ll == pytest.approx(lm_reference(row)[0], rel=1e-5)
        frames = np.random.default_rng(4).standard_normal((7, 6)).astype(np.float32)
        got = []
        for i, (a, b) in enumerate([(0, 3), (3, 7)]):
            inp = tritonclient.InferInput("frames", [b - a, 6], "FP32")
            inp.set_data_from_numpy(frames[a:b])
            res = client.infer("stream", [inp], sequence_id=42, sequence_start=i == 0, sequence_end=b == 7)
            got.append(res.as_numpy("outputs"))
        np.testing.assert_allclose(np.concatenate(got), STREAM.forward(frames[:, None])[0][:, 0], rtol=1e-5, atol=1e-6)
        with pytest.raises(tritonclient.InferenceServerException, match="token ids"):
            inp = tritonclient.InferInput("tokens", [1, 2], "INT64")
            inp.set_data_from_numpy(np.array([[1, VOCAB]], np.int64))
            client.infer("lm", [inp])
        client.close()


def test_graceful_shutdown_finishes_or_fails_in_flight_requests(http_frontend):
    import httpx

    statuses = []
    repository = make_repository()
    with BackgroundServer(create_app(repository)) as server:
        long_tokens = tensor("tokens", list(range(VOCAB)) * 40, "INT64")

        def call():
            try:
                r = httpx.post(f"{server.url}/v2/models/lm/infer", json={"inputs": [long_tokens]}, timeout=60)
                statuses.append(r.status_code)
            except httpx.HTTPError as exc:
                statuses.append(type(exc).__name__)

        threads = [threading.Thread(target=call) for _ in range(8)]
        [t.start() for t in threads]
        # every request reached the engine (a connection whose request has not arrived is closed at shutdown,
        # as any server does; that is not what this test is about)
        engine, deadline = repository.get("lm").engine, time.time() + 20
        while engine.pending() + len(statuses) < 8 and time.time() < deadline:
            time.sleep(0.01)
    [t.join(60) for t in threads]
    assert not any(t.is_alive() for t in threads)  # nothing hangs
    assert len(statuses) == 8 and all(s in (200, 503) for s in statuses), statuses


def test_bench_floor_server_answers_every_request_on_a_kept_connection():
    """bench http's floor: the client-alone latency is only the client's if the floor answers each request of a
    keep-alive connection, bodies split across packets included, with exactly the ready-made response; and
    bench http's own client times each of its requests over its connections."""
    import http.client
    import multiprocessing

    from cellserve.bench.common import free_port
    from cellserve.bench.http import _floor_server, _http_request, _run_http, _wait_listening

    port, body = free_port(), b'{"outputs": []}'
    floor = multiprocessing.get_context("spawn").Process(target=_floor_server, args=(port, body), daemon=True)
    floor.start()
    try:
        _wait_listening(port)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for payload in (b"{}", b"x" * 70000, b""):
            conn.request("POST", "/v2/models/speller/infer", body=payload)
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, body)
        requests = [_http_request(str(n)) for n in range(7)] + [b"POST / HTTP/1.1\r\ncontent-length: 70000\r\n\r\n"
                                                                 + b"x" * 70000]
        latencies = _run_http(port, requests, clients=3)
        assert len(latencies) == len(requests) and (latencies > 0).all()
    finally:
        floor.terminate()


def test_bench_process_cpu_counts_finer_than_ticks_and_keeps_ended_threads():
    """The benches' CPU per request: a 30 ms burn reads as 30 ms, not 0 or 40 (the 10 ms ticks of
    /proc/<pid>/stat), and a thread that ended between two reads still counts."""
    import threading

    from cellserve.bench.common import process_cpu_seconds

    def burn(seconds):
        start = time.thread_time()
        while time.thread_time() - start < seconds:
            pass

    pid = os.getpid()
    before = process_cpu_seconds(pid)
    burn(0.03)
    assert 0.029 <= process_cpu_seconds(pid) - before < 0.037
    thread = threading.Thread(target=burn, args=(0.03,))
    thread.start()
    middle = process_cpu_seconds(pid)  # (the thread seen alive)
    thread.join()
    after = process_cpu_seconds(pid)
    assert 0.01 <= after - before - 0.03 < 0.05  # (the ended thread to the 10 ms tick)
    assert after >= middle


def test_json_tensors_are_converted_and_checked_and_answers_keep_every_value():
    """The JSON fast paths (orjson, integers of the wanted type taken as they are) keep the protocol's checks,
    and a float32 answer reads back bit for bit."""
    from cellserve.server.protocol import InferRequest, InferResponse, ProtocolError, _from_json, build_response

    assert _from_json("x", [1, 2], "INT32").dtype == np.int32
    assert _from_json("x", [1, 2], "FP32").dtype == np.float32
    assert _from_json("x", [True, False], "BOOL").tolist() == [True, False]
    for data, datatype, message in [([300], "INT8", "out of range"), ([1.5], "INT64", "integers"),
                                    ([True], "INT64", "integers"), ([[1], [2, 3]], "INT64", "numbers")]:
        with pytest.raises(ProtocolError, match=message):
            _from_json("x", data, datatype)
    values = np.random.default_rng(0).standard_normal(50).astype(np.float32)
    outputs = {"y": values.reshape(5, 10), "big_endian": np.arange(3, dtype=">i4"), "b": np.array([True, False]),
               "s": np.array(["hé".encode()], dtype=object)}
    body, headers = build_response(InferResponse("m", "1", None, outputs), InferRequest(None, {}, {}))
    got = {o["name"]: o for o in json.loads(body)["outputs"]}
    np.testing.assert_array_equal(np.array(got["y"]["data"], np.float32), values)
    assert (got["y"]["shape"], got["y"]["datatype"]) == ([5, 10], "FP32")
    assert (got["big_endian"]["data"], got["big_endian"]["datatype"]) == ([0, 1, 2], "INT32")
    assert got["b"]["data"] == [True, False] and got["s"]["data"] == ["hé"]
    assert headers == {"Content-Type": "application/json"}


@given(st.lists(st.one_of(st.integers(0, 600), st.floats(0, 20, allow_nan=False)), max_size=40))
def test_observing_many_values_at_once_exposes_what_one_at_a_time_does(values):
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from cellserve.server.metrics import BATCH_BUCKETS, observe_all

    exposed = []
    for together in (False, True):
        registry = CollectorRegistry()
        child = Histogram("h", "h", ["model"], buckets=BATCH_BUCKETS, registry=registry).labels("m")
        if together:
            observe_all(child, values)
        else:
            for value in values:
                child.observe(value)
        exposed.append([line for line in generate_latest(registry).decode().splitlines() if "_created" not in line])
    assert exposed[0] == exposed[1]
