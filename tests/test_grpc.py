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
from conftest import GRPC_FRONTENDS  # noqa: E402
from test_server import LM, STREAM, VOCAB, lm_reference, make_repository  # noqa: E402

OTHER = RNN.random("sru", 6, 10, num_layers=1, seed=9)  # same tensors, another architecture


@pytest.fixture(scope="module", params=GRPC_FRONTENDS)
def server(request):
    repository = make_repository()
    for name, model, config in (("other", OTHER, ModelConfig(block_steps=3)),
                                ("capped", STREAM, ModelConfig(block_steps=3, max_sessions=2))):
        repository.models[name] = serve_model(name, model, config)
    app = create_app(repository, grpc_port=0, model_control="explicit", grpc_frontend=request.param)
    assert app.state.grpc_frontend == request.param
    with BackgroundServer(app) as background:
        background.grpc_port, background.grpc_frontend = app.state.grpc_port, app.state.grpc_frontend
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


METHOD = "/inference.GRPCInferenceService/"


def raw_unary(channel, method="ModelInfer"):
    """A call that sends bytes as they are (no serializer): what a broken client can put on the wire."""
    return channel.unary_unary(METHOD + method, request_serializer=None, response_deserializer=None)


def lm_request(tokens, request_id="", **parameters):
    request = pb.ModelInferRequest(model_name="lm", id=request_id)
    request.inputs.add(name="tokens", datatype="INT64", shape=[1, len(tokens)])
    request.raw_input_contents.append(np.asarray(tokens, np.int64).tobytes())
    for key, value in parameters.items():
        setattr(request.parameters[key], {bool: "bool_param", str: "string_param"}[type(value)], value)
    return request


def stream_request(frames, sequence_id, request_id="", **flags):
    request = pb.ModelInferRequest(model_name="stream", id=request_id)
    request.inputs.add(name="frames", datatype="FP32", shape=list(frames.shape))
    request.raw_input_contents.append(np.ascontiguousarray(frames, np.float32).tobytes())
    request.parameters["sequence_id"].string_param = sequence_id
    for key, value in flags.items():
        request.parameters[key].bool_param = value
    return request


def test_malformed_protobuf_is_invalid_argument_and_the_server_goes_on(server):
    # (grpcio's own deserializer answers UNKNOWN before the Python front end sees the call)
    code = grpc.StatusCode.INVALID_ARGUMENT if server.grpc_frontend == "native" else grpc.StatusCode.UNKNOWN
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        for junk in (b"\xff\xff\xff", b"\x0a\x05lm", b"\x12\x80\x80\x80\x80\x10"):
            with pytest.raises(grpc.RpcError) as bad:
                raw_unary(channel)(junk, timeout=10)
            assert bad.value.code() == code and bad.value.details()
        with pytest.raises(grpc.RpcError) as bad:  # a control call's request too
            raw_unary(channel, "ModelMetadata")(b"\xff\xff", timeout=10)
        assert bad.value.code() == code
        if server.grpc_frontend != "native":
            return
        stream = channel.stream_stream(METHOD + "ModelStreamInfer", request_serializer=None,
                                       response_deserializer=pb.ModelStreamInferResponse.FromString)
        answers = list(stream(iter([b"\xff\xff", lm_request([1, 2, 3], "ok").SerializeToString()]), timeout=30))
        assert [bool(a.error_message) for a in answers] == [True, False]
        assert "malformed" in answers[0].error_message and answers[1].infer_response.id == "ok"
        answer = pb.ModelInferResponse.FromString(raw_unary(channel)(lm_request([1, 2, 3]).SerializeToString()))
        assert np.frombuffer(answer.raw_output_contents[1], np.int64)[0] == lm_reference([1, 2, 3])[1]


def test_streams_cut_mid_session_and_clients_that_stop_reading_leave_the_others_served(server):
    frames = np.random.default_rng(8).standard_normal((40, 6)).astype(np.float32)
    address = f"127.0.0.1:{server.grpc_port}"
    for cut in range(3):
        channel = grpc.insecure_channel(address)
        stub = pbg.GRPCInferenceServiceStub(channel)

        def requests(cut=cut):  # a session opened and never ended; the client vanishes
            yield stream_request(frames[:3], f"cut-{cut}", sequence_start=True)
            for i in range(60):
                yield stream_request(frames[i % 30:i % 30 + 3], f"cut-{cut}")

        calls = stub.ModelStreamInfer(requests())
        if cut == 0:
            next(calls)  # reads one answer, then stops reading
        time.sleep(0.2)
        calls.cancel() if cut < 2 else None
        channel.close()
    with grpc.insecure_channel(address) as channel:  # a well-formed session beside them is exact
        stub = pbg.GRPCInferenceServiceStub(channel)
        chunks = [stream_request(frames[0:7], "after", "a", sequence_start=True),
                  stream_request(frames[7:20], "after", "b", sequence_end=True)]
        answers = list(stub.ModelStreamInfer(iter(chunks), timeout=30))
        got = np.concatenate([np.frombuffer(a.infer_response.raw_output_contents[0], np.float32).reshape(-1, 10)
                              for a in sorted(answers, key=lambda a: a.infer_response.id)])
        np.testing.assert_allclose(got, one_pass(frames[:20]), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(len(GRPC_FRONTENDS) < 2, reason="this build has no native gRPC front end (grpc++ missing)")
def test_both_front_ends_answer_byte_identical_messages():
    frames = np.random.default_rng(9).standard_normal((9, 6)).astype(np.float32)
    s2s = pb.ModelInferRequest(model_name="s2s", id="s")
    s2s.inputs.add(name="tokens", datatype="INT64", shape=[2, 4])
    s2s.raw_input_contents.append(np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.int64).tobytes())
    bad = lm_request([1, 2, VOCAB + 3], "bad")
    unary = [lm_request([1, 2, 3], "x"), s2s, bad]
    streamed = [stream_request(frames[:4], "same", "0", sequence_start=True), lm_request([4, 5], "1"),
                stream_request(frames[4:], "same", "2", sequence_end=True), bad]
    seen = {}
    for frontend in GRPC_FRONTENDS:
        app = create_app(make_repository(), grpc_port=0, grpc_frontend=frontend)
        with BackgroundServer(app), grpc.insecure_channel(f"127.0.0.1:{app.state.grpc_port}") as channel:
            out = []
            for request in unary:
                try:
                    out.append(raw_unary(channel)(request.SerializeToString(), timeout=30))
                except grpc.RpcError as exc:
                    out.append((exc.code(), exc.details()))
            stream = channel.stream_stream(METHOD + "ModelStreamInfer", request_serializer=None,
                                           response_deserializer=None)
            answers = list(stream(iter([r.SerializeToString() for r in streamed]), timeout=30))
            out.append(sorted(answers))  # (answers come as they finish)
            seen[frontend] = out
    assert seen["native"] == seen["python"]
    assert isinstance(seen["native"][2], tuple) and seen["native"][2][0] == grpc.StatusCode.INVALID_ARGUMENT


def test_fuzzed_and_mutated_wire_bytes_for_a_bounded_time_beside_a_correct_client(server):
    """Random and mutated messages on unary and stream calls for 2 s; the correct client's answers beside
    them stay exact and the server stays up."""
    rng = np.random.default_rng(11)
    good = lm_request([3, 1, 4, 1, 5]).SerializeToString()
    expected = lm_reference([3, 1, 4, 1, 5])[1]
    address, stop, failures = f"127.0.0.1:{server.grpc_port}", threading.Event(), []
    frontend = server.grpc_frontend
    allowed = () if frontend == "native" else (grpc.StatusCode.UNKNOWN,)

    def mutated():
        data = bytearray(good)
        for _ in range(int(rng.integers(1, 6))):
            kind, at = rng.integers(0, 3), int(rng.integers(0, len(data)))
            if kind == 0:
                data[at] = int(rng.integers(0, 256))
            elif kind == 1:
                del data[at:at + int(rng.integers(1, 8))]
            else:
                data[at:at] = rng.bytes(int(rng.integers(1, 8)))
        return bytes(data) if rng.random() < 0.8 else rng.bytes(int(rng.integers(0, 80)))

    def fuzz():
        with grpc.insecure_channel(address) as channel:
            stream = channel.stream_stream(METHOD + "ModelStreamInfer", request_serializer=None,
                                           response_deserializer=None)
            while not stop.is_set():
                try:
                    raw_unary(channel, str(rng.choice(["ModelInfer", "ModelMetadata", "ModelReady"])))(
                        mutated(), timeout=10)
                except grpc.RpcError as exc:
                    if exc.code() not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                          grpc.StatusCode.UNAVAILABLE, *allowed):
                        failures.append((exc.code(), exc.details()))
                try:
                    list(stream(iter([mutated() for _ in range(3)]), timeout=10))
                except grpc.RpcError as exc:
                    # (the Python front end ends a stream at a message grpcio cannot parse; the native one
                    # answers it in the stream and goes on)
                    if exc.code() != grpc.StatusCode.INVALID_ARGUMENT or frontend == "native":
                        failures.append((exc.code(), exc.details()))

    thread = threading.Thread(target=fuzz)
    thread.start()
    deadline, checked = time.monotonic() + 2.0, 0
    try:
        with grpc.insecure_channel(address) as channel:
            while time.monotonic() < deadline:
                answer = pb.ModelInferResponse.FromString(raw_unary(channel)(good, timeout=10))
                assert np.frombuffer(answer.raw_output_contents[1], np.int64)[0] == expected
                checked += 1
    finally:
        stop.set()
        thread.join(30)
    assert checked > 5 and not failures, failures[:3]


def test_the_front_end_is_chosen_named_and_falls_back_where_grpc_plus_plus_is_missing(server, monkeypatch):
    from cellserve.server.native import grpc_front

    meta = httpx.get(f"{server.url}/v2").json()
    assert meta["grpc_frontend"] == server.grpc_frontend  # the server metadata says which serves
    monkeypatch.delenv("CELLSERVE_GRPC_FRONTEND", raising=False)
    assert grpc_front.grpc_frontend_of(None)[0] == ("native" if grpc_front.AVAILABLE else "python")
    assert grpc_front.grpc_frontend_of("python")[0] == "python"
    monkeypatch.setattr(grpc_front, "AVAILABLE", False)  # a build without grpc++
    assert grpc_front.grpc_frontend_of(None)[0] == "python"
    with pytest.raises(ValueError, match="libgrpc\\+\\+-dev"):
        grpc_front.grpc_frontend_of("native")
    with pytest.raises(ValueError, match="one of native, python"):
        grpc_front.grpc_frontend_of("rust")


@pytest.mark.skipif(len(GRPC_FRONTENDS) < 2, reason="this build has no native gRPC front end (grpc++ missing)")
def test_both_front_ends_answer_the_embedded_speller_byte_identically():
    from cellserve.tasks.speller import encode_number

    requests = []
    for i, number in enumerate(["7", "1234", "90210"]):
        request = pb.ModelInferRequest(model_name="speller", id=str(i))
        request.inputs.add(name="tokens", datatype="INT64", shape=[1, len(number)])
        request.raw_input_contents.append(np.array([encode_number(number)], np.int64).tobytes())
        request.inputs.add(name="max_output_tokens", datatype="INT64", shape=[1])
        request.raw_input_contents.append(np.array([16], np.int64).tobytes())
        requests.append(request.SerializeToString())
    seen = {}
    for frontend in GRPC_FRONTENDS:
        app = create_app(Repository.defaults(), grpc_port=0, grpc_frontend=frontend)
        with BackgroundServer(app), grpc.insecure_channel(f"127.0.0.1:{app.state.grpc_port}") as channel:
            seen[frontend] = [raw_unary(channel)(r, timeout=30) for r in requests]
    assert seen["native"] == seen["python"]
    words = pb.ModelInferResponse.FromString(seen["native"][1])
    text = words.raw_output_contents[[o.name for o in words.outputs].index("text")]
    assert text[4:] == b"one thousand two hundred thirty four"  # (BYTES: a 4-byte length, then the text)
