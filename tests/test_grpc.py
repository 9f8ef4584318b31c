"""gRPC (KServe v2 / Triton GRPCInferenceService) with tritonclient.grpc unchanged, streaming sessions over
ModelStreamInfer, session snapshots and restores, session capacity, the repository/statistics/config
extensions on both wires, and fuzzed gRPC messages."""

import base64
import queue
import threading
import time

import grpc
import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pbg

from cellserve.models import RNN
from cellserve.server.app import create_app
from cellserve.server.background import BackgroundServer
from cellserve.server.repository import ModelConfig, Repository, serve_model

tritonclient = pytest.importorskip("tritonclient.grpc")
from test_server import LM, STREAM, VOCAB, lm_reference, make_repository  # noqa: E402

OTHER = RNN.random("sru", 6, 10, num_layers=1, seed=9)  # same tensors, another architecture


@pytest.fixture(scope="module")
def server():
    repository = make_repository()
    for name, model, config in (("other", OTHER, ModelConfig(block_steps=3)),
                                ("capped", STREAM, ModelConfig(block_steps=3, max_sessions=2))):
        repository.models[name] = serve_model(name, model, config)
    app = create_app(repository, grpc_port=0, model_control="explicit")
    with BackgroundServer(app) as background:
        background.grpc_port = app.state.grpc_port
        yield background


@pytest.fixture
def client(server):
    c = tritonclient.InferenceServerClient(url=f"127.0.0.1:{server.grpc_port}")
    yield c
    c.close()


def frames_input(frames, name="frames"):
    inp = tritonclient.InferInput(name, list(frames.shape), "FP32")
    inp.set_data_from_numpy(np.ascontiguousarray(frames, np.float32))
    return inp


def blob_input(blob):
    inp = tritonclient.InferInput("sequence_snapshot", [1], "BYTES")
    inp.set_data_from_numpy(np.array([blob], dtype=object))
    return inp


def one_pass(frames, model=STREAM):
    return model.forward(frames[:, None])[0][:, 0]


def test_metadata_config_and_unary_infer(client):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("lm")
    meta = client.get_server_metadata()
    assert meta.name == "cellserve" and "model_repository" in meta.extensions and "statistics" in meta.extensions
    assert [t.name for t in client.get_model_metadata("lm").inputs] == ["tokens"]
    config = client.get_model_config("stream").config
    assert config.name == "stream" and config.sequence_batching.max_sequence_idle_microseconds == 60_000_000
    assert [i.name for i in config.input] == ["frames", "sequence_snapshot"]
    tokens = np.random.default_rng(3).integers(0, VOCAB, (3, 6)).astype(np.int64)
    inp = tritonclient.InferInput("tokens", list(tokens.shape), "INT64")
    inp.set_data_from_numpy(tokens)
    result = client.infer("lm", [inp])
    for row, ll, nxt in zip(tokens, result.as_numpy("log_likelihood"), result.as_numpy("next_token")):
        assert ll == pytest.approx(lm_reference(row)[0], rel=1e-5) and nxt == lm_reference(row)[1]


def test_bad_input_is_invalid_argument_and_unknown_model_not_found(client):
    inp = tritonclient.InferInput("tokens", [1, 2], "INT64")
    inp.set_data_from_numpy(np.array([[1, VOCAB]], np.int64))
    with pytest.raises(tritonclient.InferenceServerException, match="token ids") as bad:
        client.infer("lm", [inp])
    assert bad.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(tritonclient.InferenceServerException) as unknown:
        client.infer("nope", [inp])
    assert unknown.value.status() == "StatusCode.NOT_FOUND"
    ok = tritonclient.InferInput("tokens", [1, 2], "INT64")
    ok.set_data_from_numpy(np.array([[1, 2]], np.int64))
    assert client.infer("lm", [ok]).as_numpy("next_token") is not None  # the server goes on


def stream_calls(client, calls):
    """Send (model, inputs, kwargs) over one ModelStreamInfer stream; results (or errors) by request id."""
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for i, (model, inputs, kwargs) in enumerate(calls):
        client.async_stream_infer(model, inputs, request_id=str(i), **kwargs)
    out = {}
    for _ in calls:
        result, error = answers.get(timeout=60)
        if error is not None:
            out[f"error{len(out)}"] = error
        else:
            out[result.get_response().id] = result
    client.stop_stream()
    return out


def test_stream_session_in_three_chunks_equals_one_pass_and_survives_a_bad_chunk(client):
    frames = np.random.default_rng(5).standard_normal((11, 6)).astype(np.float32)
    tokens = tritonclient.InferInput("tokens", [1, 3], "INT64")
    tokens.set_data_from_numpy(np.array([[1, 2, 3]], np.int64))
    calls = [("stream", [frames_input(frames[0:4])], dict(sequence_id="grpc-s", sequence_start=True)),
             ("stream", [frames_input(np.zeros((2, 5)))], dict(sequence_id="grpc-other", sequence_start=True)),
             ("stream", [frames_input(frames[4:9])], dict(sequence_id="grpc-s")),
             ("lm", [tokens], {}),
             ("stream", [frames_input(frames[9:])], dict(sequence_id="grpc-s", sequence_end=True))]
    out = stream_calls(client, calls)
    errors = [v for k, v in out.items() if k.startswith("error")]
    assert len(errors) == 1 and "frames must have shape" in str(errors[0])
    got = np.concatenate([out[i].as_numpy("outputs") for i in ("0", "2", "4")])
    np.testing.assert_allclose(got, one_pass(frames), rtol=1e-5, atol=1e-6)
    assert out["3"].as_numpy("next_token")[0] == lm_reference([1, 2, 3])[1]


def test_snapshot_then_restore_equals_an_uninterrupted_run(client):
    frames = np.random.default_rng(6).standard_normal((14, 6)).astype(np.float32)
    first = client.infer("stream", [frames_input(frames[:7])], sequence_id="snap-a", sequence_start=True,
                         parameters={"sequence_snapshot": True})
    blob = first.as_numpy("sequence_snapshot")[0]
    assert int(first.get_response().parameters["frames_pending"].int64_param) == 1  # 7 frames, blocks of 3
    # resume on a new sequence id (as on another replica) from the blob, and finish there
    rest = client.infer("stream", [frames_input(frames[7:]), blob_input(blob)], sequence_id="snap-b",
                        sequence_end=True, parameters={"sequence_restore": True})
    got = np.concatenate([first.as_numpy("outputs"), rest.as_numpy("outputs")])
    np.testing.assert_allclose(got, one_pass(frames), rtol=1e-6, atol=1e-6)
    # the original sequence is untouched and can go on too
    tail = client.infer("stream", [frames_input(frames[7:])], sequence_id="snap-a", sequence_end=True)
    np.testing.assert_allclose(tail.as_numpy("outputs"), rest.as_numpy("outputs"), rtol=1e-6, atol=1e-7)


def test_foreign_or_corrupted_snapshots_are_refused_and_lose_nothing(client, server):
    frames = np.random.default_rng(7).standard_normal((6, 6)).astype(np.float32)
    mine = client.infer("stream", [frames_input(frames[:3])], sequence_id="keep", sequence_start=True,
                        parameters={"sequence_snapshot": True}).as_numpy("sequence_snapshot")[0]
    foreign = client.infer("other", [frames_input(frames[:3])], sequence_id="o", sequence_start=True,
                           parameters={"sequence_snapshot": True}).as_numpy("sequence_snapshot")[0]
    corrupted = bytearray(base64.b64decode(mine))  # a flipped bit inside: the checksum catches it
    corrupted[len(corrupted) // 2] ^= 0x10
    corrupted = base64.b64encode(bytes(corrupted))
    for blob, message in ((foreign, "snapshot is of model 'other'"), (corrupted, "corrupted"),
                          (b"hello", "not a cellserve session snapshot")):
        with pytest.raises(tritonclient.InferenceServerException, match=message) as refused:
            client.infer("stream", [blob_input(blob)], sequence_id="r", parameters={"sequence_restore": True})
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    body = {"inputs": [{"name": "sequence_snapshot", "shape": [1], "datatype": "BYTES", "data": ["garbage"]}],
            "parameters": {"sequence_id": "h", "sequence_restore": True}}
    res = httpx.post(f"{server.url}/v2/models/stream/infer", json=body)
    assert res.status_code == 400 and "snapshot" in res.json()["error"]
    rest = client.infer("stream", [frames_input(frames[3:])], sequence_id="keep", sequence_end=True)
    np.testing.assert_allclose(rest.as_numpy("outputs"), one_pass(frames)[3:], rtol=1e-5, atol=1e-6)


def test_sessions_past_capacity_are_refused_not_evicted(client, server):
    frames = np.zeros((3, 6), np.float32)
    for sid in ("c1", "c2"):
        client.infer("capped", [frames_input(frames)], sequence_id=sid, sequence_start=True)
    with pytest.raises(tritonclient.InferenceServerException, match="maximum of 2 open sequences") as full:
        client.infer("capped", [frames_input(frames)], sequence_id="c3", sequence_start=True)
    assert full.value.status() == "StatusCode.UNAVAILABLE"
    body = {"inputs": [{"name": "frames", "shape": [3, 6], "datatype": "FP32", "data": [0.0] * 18}],
            "parameters": {"sequence_id": "c4", "sequence_start": True}}
    assert httpx.post(f"{server.url}/v2/models/capped/infer", json=body).status_code == 503
    for sid in ("c1", "c2"):  # both still open: none was evicted to make room
        client.infer("capped", [frames_input(frames)], sequence_id=sid, sequence_end=True)
    client.infer("capped", [frames_input(frames)], sequence_id="c3", sequence_start=True, sequence_end=True)


def test_statistics_add_up(client, server):
    before = client.get_inference_statistics("lm", as_json=True)["model_stats"][0]
    ok = tritonclient.InferInput("tokens", [2, 3], "INT64")
    ok.set_data_from_numpy(np.array([[1, 2, 3], [4, 5, 6]], np.int64))
    for _ in range(3):
        client.infer("lm", [ok])
    bad = tritonclient.InferInput("tokens", [1, 1], "INT64")
    bad.set_data_from_numpy(np.array([[VOCAB]], np.int64))
    with pytest.raises(tritonclient.InferenceServerException):
        client.infer("lm", [bad])
    after = httpx.get(f"{server.url}/v2/models/lm/stats").json()["model_stats"][0]
    stats, old = after["inference_stats"], before["inference_stats"]

    def delta(key, field="count"):
        return int(stats[key][field]) - int(old.get(key, {}).get(field, 0))

    assert delta("success") == 3 and delta("fail") == 1
    assert int(after["inference_count"]) - int(before.get("inference_count", 0)) == 6  # rows
    assert all(delta(k) == 3 for k in ("queue", "compute_input", "compute_infer", "compute_output"))
    parts = sum(delta(k, "ns") for k in ("queue", "compute_input", "compute_infer", "compute_output"))
    assert 0 < parts <= delta("success", "ns")
    assert int(after["execution_count"]) > int(before.get("execution_count", 0))


def test_repository_index_load_and_unload_over_both_wires(server, client, tmp_path):
    http_client = pytest.importorskip("tritonclient.http").InferenceServerClient(url=f"127.0.0.1:{server.port}")
    names = {m["name"]: m["state"] for m in http_client.get_model_repository_index()}
    assert names["lm"] == "READY" and names["stream"] == "READY"
    assert {m.name for m in client.get_model_repository_index().models} == set(names)
    with pytest.raises(Exception, match="no model 'missing'"):
        client.load_model("missing")
    assert httpx.post(f"{server.url}/v2/repository/models/missing/load").json()["error"]
    http_client.close()


def test_every_error_is_json_with_a_message(server):
    for method, path, status in (("GET", "/v3/nothing", 404), ("GET", "/v2/models/nope", 404),
                                 ("DELETE", "/v2/models/lm", 405), ("POST", "/v2/repository/index", 200)):
        res = httpx.request(method, server.url + path)
        assert res.status_code == status
        if status >= 400:
            assert res.json()["error"]
    assert "model_repository" in httpx.get(server.url + "/v2").json()["extensions"]


def test_reload_under_load_fails_no_request(tmp_path):
    from cellserve import models

    folder = tmp_path / "lm"
    folder.mkdir()
    models.save(LM, folder / "model.safetensors")
    app = create_app(Repository.from_directory(tmp_path), grpc_port=0, model_control="explicit")
    statuses, stop = [], threading.Event()
    with BackgroundServer(app) as background:
        body = {"inputs": [{"name": "tokens", "shape": [1, 20], "datatype": "INT64", "data": list(range(20))}]}

        def hammer():
            with httpx.Client(base_url=background.url, timeout=60) as http:
                while not stop.is_set():
                    statuses.append(http.post("/v2/models/lm/infer", json=body).status_code)

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        [t.start() for t in threads]
        time.sleep(0.3)
        for _ in range(3):
            assert httpx.post(f"{background.url}/v2/repository/models/lm/load", timeout=60).status_code == 200
            time.sleep(0.2)
        stop.set()
        [t.join(60) for t in threads]
        index = httpx.post(f"{background.url}/v2/repository/index").json()
        assert index == [{"name": "lm", "version": "1", "state": "READY", "reason": ""}]
        assert httpx.post(f"{background.url}/v2/repository/models/lm/unload").status_code == 200
        assert httpx.post(f"{background.url}/v2/models/lm/infer", json=body).status_code == 404
        assert httpx.post(f"{background.url}/v2/repository/index").json()[0]["state"] == "UNAVAILABLE"
    assert len(statuses) > 20 and set(statuses) == {200}, (len(statuses), set(statuses))


names = st.sampled_from(["lm", "stream", "tree", "s2s", "", "nope"])
dtypes = st.sampled_from(["INT64", "INT32", "FP32", "FP64", "BYTES", "BOOL", "UINT8", "", "nope"])
params = st.dictionaries(st.sampled_from(["sequence_id", "sequence_start", "sequence_end", "sequence_snapshot",
                                          "sequence_restore", "x"]),
                         st.booleans() | st.integers(-3, 3) | st.text(max_size=3), max_size=3)
tensors = st.fixed_dictionaries({"name": st.sampled_from(["tokens", "frames", "parents", "sequence_snapshot", "x"]),
                                 "datatype": dtypes, "shape": st.lists(st.integers(0, 6), max_size=3)})


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names, st.lists(tensors, max_size=3), params, st.lists(st.binary(max_size=64), max_size=3), st.booleans())
def test_fuzzed_grpc_messages_never_break_the_server(server, model, inputs, parameters, raw, use_raw):
    request = pb.ModelInferRequest(model_name=model)
    for spec in inputs:
        request.inputs.add(**spec)
    for key, value in parameters.items():
        field = {bool: "bool_param", int: "int64_param", str: "string_param"}[type(value)]
        setattr(request.parameters[key], field, value)
    if use_raw:
        request.raw_input_contents.extend(raw)
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = pbg.GRPCInferenceServiceStub(channel)
        try:
            stub.ModelInfer(request, timeout=30)
        except grpc.RpcError as exc:
            assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                  grpc.StatusCode.UNAVAILABLE), exc.details()
            assert exc.details()
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready


def test_tritonclient_and_our_service_share_one_protobuf_package():
    """We import tritonclient's generated `inference` package instead of registering a second copy."""
    import tritonclient.grpc.service_pb2 as theirs

    from cellserve.server import grpc_service

    assert grpc_service.pb is theirs
