"""The native gRPC front end's token lanes (server/native/token_lanes.cpp): the speller's and a language
model's stateless requests are parsed, coded, admitted into their engine's running step loop and answered
natively. Every answer, good
or bad, equals the Python front end's byte for byte; what the lane does not take goes to Python; under
concurrent clients each answer equals the model's unbatched run and none is lost; statistics count them."""

import threading

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from cellserve.server.app import create_app
from cellserve.server.background import BackgroundServer
from cellserve.server.backend import LocalBackend
from cellserve.server.native import grpc_front
from cellserve.server.repository import ModelConfig, Repository, serve_model
from cellserve.tasks.speller import MAX_NUMBER, decode_words, encode_number, load_default
from test_server import LM, VOCAB, lm_reference  # noqa: E402

pytestmark = pytest.mark.skipif(not getattr(grpc_front._grpc_front, "LANES", 0),
                                reason="this build has no native lanes (grpc++ or tritonclient missing)")
METHOD = "/inference.GRPCInferenceService/"
SPELLER = load_default()


def repository() -> Repository:
    return Repository([serve_model("speller", SPELLER, ModelConfig(text_codec="number-speller")),
                       serve_model("lm", LM, ModelConfig())])


def text_request(texts, rid="", raw=True, outputs=(), limits=None, shape=None) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="speller", id=rid)
    tensor = request.inputs.add(name="text", datatype="BYTES", shape=shape or [len(texts)])
    values = [t if isinstance(t, bytes) else t.encode() for t in texts]
    if raw:
        request.raw_input_contents.append(b"".join(len(v).to_bytes(4, "little") + v for v in values))
    else:
        tensor.contents.bytes_contents.extend(values)
    if limits is not None:
        limit = request.inputs.add(name="max_output_tokens", datatype="INT64", shape=[len(limits)])
        if raw:
            request.raw_input_contents.append(np.asarray(limits, np.int64).tobytes())
        else:
            limit.contents.int64_contents.extend(limits)
    for name in outputs:
        request.outputs.add(name=name)
    return request


def token_request(tokens, rid="", datatype="INT64", model="speller", outputs=()) -> pb.ModelInferRequest:
    tokens = np.asarray(tokens)
    request = pb.ModelInferRequest(model_name=model, id=rid)
    for name in outputs:
        request.outputs.add(name=name)
    request.inputs.add(name="tokens", datatype=datatype, shape=list(tokens.shape))
    request.raw_input_contents.append(tokens.astype(np.int64 if datatype == "INT64" else np.int32).tobytes())
    return request


GOOD = [text_request(["40712"], "a"), text_request(["7", " 123 ", "999999", "000012"], "b"),
        text_request(["31"], "c", raw=False), text_request(["5", "6"], "d", limits=[3]),
        text_request(["5", "60"], "e", limits=[1, 4], raw=False), text_request(["88"], "f", outputs=["text"]),
        text_request(["88"], "g", outputs=["lengths", "tokens", "lengths"]), text_request(["1", "2"], shape=[2, 1]),
        token_request([[1, 2, 3, 4], [5, 6, 7, 8]], "h"), token_request([9, 0, 1], "i"),
        token_request([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]], "lm1", model="lm"), token_request([7], "lm2", model="lm"),
        token_request([2, 7, 1], "lm3", model="lm", outputs=["next_token"])]
# all of these go to Python, which answers (or refuses) them as it always has
PYTHON = [text_request(["12a"], "j"), text_request(["1234567"], "k"), text_request(["١٢"], "l"),
          text_request([""], "m"), text_request(["5"], "n", limits=[0]), text_request(["5"], "o", outputs=["nope"]),
          text_request(["5", "6", "7"], "p", limits=[1, 2]), token_request([[1, 2, 30]], "q"),
          token_request([[1, 2, 3]], "r", datatype="INT32"), token_request([[1, VOCAB]], "lm4", model="lm"),
          token_request([[1, 2]], "lm5", model="lm", outputs=["tokens"])]


def with_parameter(request: pb.ModelInferRequest) -> pb.ModelInferRequest:
    request.parameters["sequence_id"].int64_param = 5
    return request


def answers(port: int, requests) -> list:
    """Each request's answer (or status) as a unary call, one at a time, then all of them on one stream. (The
    language model's log-likelihoods depend on their step's batch in the last bits, and a stream's requests
    batch as they arrive, so its answers stay out of the stream: byte for byte holds for one batching.)"""
    out = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        unary = channel.unary_unary(METHOD + "ModelInfer", request_serializer=None, response_deserializer=None)
        for request in requests:
            try:
                out.append(unary(request.SerializeToString(), timeout=30))
            except grpc.RpcError as exc:
                out.append((exc.code(), exc.details()))
        stream = channel.stream_stream(METHOD + "ModelStreamInfer", request_serializer=None, response_deserializer=None)
        streamed = [r.SerializeToString() for r in requests if r.model_name != "lm"]
        out.append(sorted(stream(iter(streamed), timeout=30)))
    return out


@pytest.fixture
def python_calls(monkeypatch):
    """Requests that reached the Python path (LocalBackend.infer_then), by id."""
    seen = []
    original = LocalBackend.infer_then

    def counted(self, name, parse, *args, **kwargs):
        def parsed():
            request = parse()
            seen.append(request.id)
            return request
        return original(self, name, parsed, *args, **kwargs)

    monkeypatch.setattr(LocalBackend, "infer_then", counted)
    return seen


def test_both_front_ends_answer_byte_identical_and_the_lane_takes_exactly_what_it_can(python_calls):
    requests = GOOD + PYTHON + [with_parameter(text_request(["5"], "s"))]
    seen = {}
    for frontend in ("native", "python"):
        python_calls.clear()
        app = create_app(repository(), grpc_port=0, grpc_frontend=frontend)
        with BackgroundServer(app):
            seen[frontend] = answers(app.state.grpc_port, requests)
            if frontend == "native":
                took_python = set(python_calls)
    for i, (native, python) in enumerate(zip(seen["native"], seen["python"])):
        request = requests[i] if i < len(requests) else None
        if request is not None and request.model_name == "lm" and isinstance(native, bytes):
            # (a row's log-likelihood differs in its last bits with the step's batch: the rest byte for byte)
            a, b = pb.ModelInferResponse.FromString(native), pb.ModelInferResponse.FromString(python)
            names = [o.name for o in a.outputs]
            if "log_likelihood" in names:
                at = names.index("log_likelihood")
                np.testing.assert_allclose(np.frombuffer(a.raw_output_contents[at], np.float64),
                                           np.frombuffer(b.raw_output_contents[at], np.float64), rtol=1e-6)
                del a.raw_output_contents[at], b.raw_output_contents[at]
            assert a == b, i
            continue
        assert native == python, i
    good_ids = {r.id for r in GOOD if r.id}
    assert not good_ids & took_python, "the lane left well-formed requests to Python"
    assert {r.id for r in PYTHON} | {"s"} <= took_python
    first = pb.ModelInferResponse.FromString(seen["native"][0])
    words = first.raw_output_contents[[o.name for o in first.outputs].index("text")][4:].decode()
    assert words == "forty thousand seven hundred twelve"
    lm = pb.ModelInferResponse.FromString(seen["native"][GOOD.index(next(r for r in GOOD if r.id == "lm1"))])
    for row, ll, nxt in zip([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]], np.frombuffer(lm.raw_output_contents[0], np.float64),
                            np.frombuffer(lm.raw_output_contents[1], np.int64)):
        assert ll == pytest.approx(lm_reference(row)[0], rel=1e-5) and nxt == lm_reference(row)[1]
    assert isinstance(seen["native"][len(GOOD)], tuple)  # "12a": refused, as Python refuses it
    assert seen["native"][len(GOOD)][0] == grpc.StatusCode.INVALID_ARGUMENT


def test_concurrent_clients_each_get_their_unbatched_answer_and_none_is_lost():
    rng = np.random.default_rng(4)
    numbers = [int(n) for n in rng.integers(0, MAX_NUMBER + 1, 16 * 25)]
    app = create_app(repository(), grpc_port=0, grpc_frontend="native")
    failures, done = [], []
    with BackgroundServer(app), grpc.insecure_channel(f"127.0.0.1:{app.state.grpc_port}") as channel:
        unary = channel.unary_unary(METHOD + "ModelInfer", request_serializer=None, response_deserializer=None)

        def client(part):
            for n in part:
                answer = pb.ModelInferResponse.FromString(unary(text_request([str(n)], str(n)).SerializeToString(),
                                                                timeout=60))
                tokens = np.frombuffer(answer.raw_output_contents[0], np.int64)
                want = SPELLER.translate(np.array(encode_number(str(n))), 16)
                text = answer.raw_output_contents[2][4:].decode()
                if answer.id != str(n) or tokens.tolist() != want or text != decode_words(want):
                    failures.append(n)
                done.append(n)

        threads = [threading.Thread(target=client, args=(numbers[i::16],)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        stats = pb.ModelStatisticsResponse.FromString(
            channel.unary_unary(METHOD + "ModelStatistics", request_serializer=None, response_deserializer=None)(
                pb.ModelStatisticsRequest(name="speller").SerializeToString(), timeout=30))
    assert not failures and sorted(done) == sorted(numbers)
    model = stats.model_stats[0]
    assert model.inference_stats.success.count == len(numbers) and model.inference_count == len(numbers)


def test_http_and_lane_requests_share_the_engine_and_both_stay_exact():
    import httpx

    app = create_app(repository(), grpc_port=0, grpc_frontend="native")
    numbers = [str(n) for n in np.random.default_rng(8).integers(0, MAX_NUMBER + 1, 60)]
    errors = []
    with BackgroundServer(app, frontend="python") as server, \
            grpc.insecure_channel(f"127.0.0.1:{app.state.grpc_port}") as channel:  # (HTTP through Python)
        unary = channel.unary_unary(METHOD + "ModelInfer", request_serializer=None, response_deserializer=None)

        def over_grpc():
            for n in numbers:
                answer = pb.ModelInferResponse.FromString(unary(text_request([n]).SerializeToString(), timeout=60))
                if answer.raw_output_contents[2][4:].decode() != decode_words(SPELLER.translate(
                        np.array(encode_number(n)), 16)):
                    errors.append(("grpc", n))

        thread = threading.Thread(target=over_grpc)
        thread.start()
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for n in numbers:
                body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [n]}]}
                out = {o["name"]: o for o in http.post("/v2/models/speller/infer", json=body).json()["outputs"]}
                if out["text"]["data"][0] != decode_words(SPELLER.translate(np.array(encode_number(n)), 16)):
                    errors.append(("http", n))
        thread.join(120)
    assert not errors


def test_front_ends_that_step_an_idle_loop_themselves_hand_it_over_and_stay_exact():
    """One client per wire: each native front end finds the loop idle and steps its request on its own thread
    (loop_face.h); with the other front end and the Python path (Arabic-Indic digits, which the lane leaves to
    Python) admitting meanwhile, the loop passes between them and the worker. Every answer is the unbatched
    run, none is lost, and the statistics count them all."""
    import httpx

    numbers = [str(n) for n in np.random.default_rng(11).integers(0, MAX_NUMBER + 1, 40)]
    want = {n: decode_words(SPELLER.translate(np.array(encode_number(n)), 16)) for n in numbers}
    models = repository()
    loop = models.models["speller"].engine.runner.loop
    app = create_app(models, grpc_port=0, grpc_frontend="native")
    errors, answered = [], []
    with BackgroundServer(app, frontend="native") as server, \
            grpc.insecure_channel(f"127.0.0.1:{app.state.grpc_port}") as channel:
        unary = channel.unary_unary(METHOD + "ModelInfer", request_serializer=None, response_deserializer=None)

        def over_grpc(python: bool):
            for n in numbers:
                text = "".join(chr(0x660 + int(d)) for d in n) if python else n
                answer = pb.ModelInferResponse.FromString(unary(text_request([text]).SerializeToString(), timeout=60))
                (errors if answer.raw_output_contents[2][4:].decode() != want[n] else answered).append(n)

        threads = [threading.Thread(target=over_grpc, args=(python,)) for python in (False, True)]
        for t in threads:
            t.start()
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for n in numbers:
                body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [n]}]}
                out = {o["name"]: o for o in http.post("/v2/models/speller/infer", json=body).json()["outputs"]}
                (errors if out["text"]["data"][0] != want[n] else answered).append(n)
        for t in threads:
            t.join(120)
        stats = httpx.get(f"{server.url}/v2/models/speller/stats").json()["model_stats"][0]
    assert not errors and len(answered) == 3 * len(numbers)
    assert int(stats["inference_stats"]["success"]["count"]) == 3 * len(numbers)
    assert int(stats["execution_count"]) >= max(len(encode_number(n)) for n in numbers)
    assert loop.caller_steps > 0
