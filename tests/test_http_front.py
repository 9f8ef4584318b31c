"""The native HTTP front end (server/native/http_front.cpp): inference requests of models with a token lane are
parsed and answered natively, JSON and binary tensors; everything else passes to the FastAPI app behind it on
the same port. Both HTTP front ends give byte-identical bodies and the same statuses on good and bad input;
the lane takes exactly the well-formed requests; tritonclient.http works unchanged; under concurrent clients
each answer equals the model's unbatched run; slow, half-closed and garbage-sending clients harm no one."""

import json
import random
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from cellserve.server.app import create_app
from cellserve.server.background import BackgroundServer, http_frontend_of
from cellserve.server.backend import LocalBackend
from cellserve.server.repository import ModelConfig, Repository, serve_model
from cellserve.tasks.speller import MAX_NUMBER, decode_words, encode_number, load_default
from test_server import LM, lm_reference  # noqa: E402

pytestmark = pytest.mark.skipif(http_frontend_of(None) != "native",
                                reason="this build has no native HTTP front end (Boost, RapidJSON or OpenSSL missing)")
SPELLER = load_default()
HEADER_LENGTH = "Inference-Header-Content-Length"


def repository(max_body_bytes=None) -> Repository:
    return Repository([serve_model("speller", SPELLER, ModelConfig(text_codec="number-speller")),
                       serve_model("lm", LM, ModelConfig())])


def text(values, rid=None, outputs=None, limits=None, shape=None, parameters=None) -> dict:
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": shape or [len(values)], "data": values}]}
    if limits is not None:
        body["inputs"].append({"name": "max_output_tokens", "datatype": "INT64", "shape": [len(limits)],
                               "data": limits})
    if rid is not None:
        body["id"] = rid
    if outputs is not None:
        body["outputs"] = outputs
    if parameters is not None:
        body["parameters"] = parameters
    return body


def binary(tensors: list, rid=None, outputs=None, parameters=None) -> tuple[bytes, dict]:
    """A binary tensor extension body: tensors are (name, datatype, shape, raw bytes)."""
    header = {"inputs": [{"name": n, "datatype": d, "shape": s, "parameters": {"binary_data_size": len(raw)}}
                         for n, d, s, raw in tensors]}
    if rid is not None:
        header["id"] = rid
    if outputs is not None:
        header["outputs"] = outputs
    if parameters is not None:
        header["parameters"] = parameters
    head = json.dumps(header).encode()
    return head + b"".join(raw for *_, raw in tensors), {HEADER_LENGTH: str(len(head))}


def texts_raw(values) -> bytes:
    return b"".join(len(v.encode()).to_bytes(4, "little") + v.encode() for v in values)


def ints(values) -> bytes:
    return np.asarray(values, np.int64).tobytes()


# (model, body, headers, taken by the lane?)
def J(body, model="speller", headers=None, taken=True):
    return (model, json.dumps(body).encode(), headers or {}, taken)


def B(parts, model="speller", taken=True):
    body, headers = parts
    return (model, body, headers, taken)


CASES = [
    J(text(["40712"], "a")), J(text(["7", " 123 ", "999999", "000012"], "b")), J(text(["31"])),
    J(text(["5", "6"], "d", limits=[3])), J(text(["5", "60"], "e", limits=[1, 4])),
    J(text(["88"], "f", outputs=[{"name": "text"}])),
    J(text(["88"], "g", outputs=[{"name": "lengths"}, {"name": "tokens"}, {"name": "lengths"}])),
    J(text(["1", "2"], "h", shape=[2, 1])), J(text(["9"], "quote\"back\\slash\ttab\nnl")),
    J(text(["12"], "i", outputs=[{"name": "tokens", "parameters": {"binary_data": True}}, {"name": "text"}])),
    J(text(["12"], "j", parameters={"binary_data_output": True})),
    J(text(["12"], "k", outputs=[{"name": "text", "parameters": {"binary_data": True}},
                                 {"name": "text", "parameters": {"binary_data": False}}])),
    J({"id": "l", "inputs": [{"name": "tokens", "datatype": "INT64", "shape": [2, 3], "data": [1, 2, 3, 4, 5, 6]}]}),
    B(binary([("text", "BYTES", [2], texts_raw(["15", "16"]))], "m")),
    B(binary([("text", "BYTES", [1], texts_raw(["77"])), ("max_output_tokens", "INT64", [1], ints([2]))], "n",
             outputs=[{"name": "text", "parameters": {"binary_data": True}}])),
    B(binary([("tokens", "INT64", [1, 4], ints([3, 1, 4, 1]))], "o", parameters={"binary_data_output": True})),
    B(binary([("tokens", "INT64", [2, 5], ints([3, 1, 4, 1, 5, 9, 2, 6, 5, 3]))], "lm1",
             outputs=[{"name": "log_likelihood", "parameters": {"binary_data": True}}, {"name": "next_token"}]),
      model="lm"),
    # Python's: refused, or answered by it
    J(text(["12a"], "p"), taken=False), J(text(["1234567"], "q"), taken=False), J(text(["\u0661\u0662"], "r"), taken=False),
    J(text([""], "s"), taken=False), J(text(["5"], "t", limits=[0]), taken=False),
    J(text(["5"], "u", outputs=[{"name": "nope"}]), taken=False), J(text(["5"], "v", limits=[1, 2, 3]), taken=False),
    J(text(["5"], "w", parameters={"sequence_id": 4}), taken=False),
    J({"id": "x", "inputs": [{"name": "tokens", "datatype": "INT32", "shape": [1, 2], "data": [1, 2]}]}, taken=False),
    J({"id": "y", "inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, 2], "data": [1.5, 2]}]},
      taken=False),
    J({"id": "z", "inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["1"]}]}, taken=False),
    J({"id": 7, "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["1"]}]}, taken=False),
    J({"inputs": []}, taken=False), J([1, 2], taken=False), J(text(["5"], "lm2"), model="lm", taken=False),
    J({"id": "lm3", "inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, 2], "data": [1, 2]}]},
      model="lm", taken=False),  # (reals in JSON: Python's float format)
    J(text(["5"], "nomodel"), model="nope", taken=False),
    ("speller", b"{not json", {}, False), ("speller", b"", {}, False),
    ("speller", json.dumps(text(["5"])).encode(), {HEADER_LENGTH: "9999"}, False),
    ("speller", json.dumps(text(["5"])).encode(), {HEADER_LENGTH: "x1"}, False),
    ("speller", json.dumps(text(["5"])).encode() + b"junk", {HEADER_LENGTH: str(len(json.dumps(text(["5"]))))},
     False),
    ("speller", b'{"id": "\\u0041Z", "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["5"]}]}',
     {}, False),
    ("speller", b'{"id": "dup", "id": "dup2", "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], '
                b'"data": ["5"]}]}', {}, False),
]


@pytest.fixture
def python_calls(monkeypatch):
    """Requests that reached the Python path (LocalBackend.infer), by id."""
    seen = []
    original = LocalBackend.infer

    async def counted(self, name, parse, *args, **kwargs):
        def parsed():
            request = parse() if callable(parse) else parse
            seen.append(request.id)
            return request
        return await original(self, name, parsed, *args, **kwargs)

    monkeypatch.setattr(LocalBackend, "infer", counted)
    return seen


def answer_of(response: httpx.Response) -> tuple:
    return (response.status_code, response.headers.get("content-type"), response.headers.get(HEADER_LENGTH),
            response.content)


def test_both_front_ends_answer_byte_identical_and_the_lane_takes_exactly_what_it_can(python_calls):
    seen = {}
    for frontend in ("native", "python"):
        python_calls.clear()
        app = create_app(repository(), max_body_bytes=1 << 16)
        with BackgroundServer(app, frontend=frontend) as server, httpx.Client(base_url=server.url) as http:
            assert server.frontend == frontend
            seen[frontend] = [answer_of(http.post(f"/v2/models/{model}/infer", content=body, headers=headers))
                              for model, body, headers, _ in CASES]
            seen[frontend].append(answer_of(http.post("/v2/models/speller/versions/1/infer",
                                                      json=text(["3"], "version"))))
            seen[frontend].append(answer_of(http.post("/v2/models/speller/versions/2/infer", json=text(["3"]))))
            over = b"[" + b" " * (1 << 16) + b"]"
            seen[frontend].append(answer_of(http.post("/v2/models/speller/infer", content=over)))
            if frontend == "native":
                took_python = list(python_calls)
    scored = next(i for i, case in enumerate(CASES) if case[0] == "lm" and case[3])
    for i, (native, python) in enumerate(zip(seen["native"], seen["python"])):
        if i == scored:  # (log-likelihoods differ in their last bits between batchings: the header exactly)
            split = int(native[2])
            assert native[:3] == python[:3] and native[3][:split] == python[3][:split]
            np.testing.assert_allclose(np.frombuffer(native[3][split:], np.float64),
                                       np.frombuffer(python[3][split:], np.float64), rtol=1e-6)
            continue
        assert native == python, (i, native, python)
    taken_ids = {"a", "b", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "lm1"}
    assert not taken_ids & set(took_python), " ".join(map(str, took_python))
    assert {"p", "q", "r", "s", "t", "u", "v", "w", "lm2", "lm3"} <= set(took_python)
    first = json.loads(seen["native"][0][3])
    assert first["outputs"][2]["data"] == ["forty thousand seven hundred twelve"] and first["id"] == "a"
    assert seen["native"][-2][0] == 404 and seen["native"][-1][0] == 413


def test_tritonclient_http_json_and_binary_on_the_native_front_end():
    import tritonclient.http as triton

    app = create_app(repository())
    with BackgroundServer(app, frontend="native") as server:
        client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
        assert client.is_server_ready() and client.get_model_metadata("speller")["name"] == "speller"
        for binary_data in (False, True):
            tensor = triton.InferInput("text", [3], "BYTES")
            tensor.set_data_from_numpy(np.array([b"5", b"1001", b"77"], dtype=object), binary_data=binary_data)
            outputs = [triton.InferRequestedOutput(n, binary_data=binary_data) for n in ("text", "lengths")]
            result = client.infer("speller", [tensor], outputs=outputs, request_id=f"r{binary_data}")
            assert [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("text")] == [
                "five", "one thousand one", "seventy seven"]
            assert result.as_numpy("lengths").tolist() == [
                len(SPELLER.translate(np.array(encode_number(n)), 16)) for n in ("5", "1001", "77")]
            assert result.get_response()["id"] == f"r{binary_data}"
        scored = triton.InferInput("tokens", [1, 5], "INT64")
        scored.set_data_from_numpy(np.array([[3, 1, 4, 1, 5]], np.int64), binary_data=True)
        result = client.infer("lm", [scored], outputs=[triton.InferRequestedOutput("log_likelihood")])
        assert result.as_numpy("log_likelihood")[0] == pytest.approx(lm_reference([3, 1, 4, 1, 5])[0], rel=1e-5)
        client.close()


def test_concurrent_clients_each_get_their_unbatched_answer_and_statistics_count_them():
    numbers = [int(n) for n in np.random.default_rng(5).integers(0, MAX_NUMBER + 1, 16 * 20)]
    app = create_app(repository())
    failures, done = [], []
    with BackgroundServer(app, frontend="native") as server:
        def client(part):
            with httpx.Client(base_url=server.url, timeout=60) as http:  # (one kept connection each)
                for n in part:
                    body = http.post("/v2/models/speller/infer", json=text([str(n)], str(n))).json()
                    out = {o["name"]: o["data"] for o in body["outputs"]}
                    want = SPELLER.translate(np.array(encode_number(str(n))), 16)
                    if body["id"] != str(n) or out["tokens"] != want or out["text"] != [decode_words(want)]:
                        failures.append(n)
                    done.append(n)

        threads = [threading.Thread(target=client, args=(numbers[i::16],)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        stats = httpx.get(f"{server.url}/v2/models/speller/stats").json()["model_stats"][0]
    assert not failures and sorted(done) == sorted(numbers)
    assert stats["inference_stats"]["success"]["count"] == len(numbers)


def raw_exchange(port: int, data: bytes, pause: float = 0.0, half_close: bool = False, read_s: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=read_s) as s:
        if pause:
            for i in range(0, len(data), 7):  # a slow client: its request in small pieces
                s.sendall(data[i:i + 7])
                time.sleep(pause)
        else:
            s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out and not half_close:
                    head, _, rest = out.partition(b"\r\n\r\n")
                    length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")]
                    if length and len(rest) >= length[0]:
                        break
        except socket.timeout:
            pass
    return out


def infer_bytes(body: dict, extra: str = "") -> bytes:
    payload = json.dumps(body).encode()
    return (f"POST /v2/models/speller/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload


def test_keep_alive_mixes_native_and_passed_on_requests_on_one_connection_and_odd_clients_are_served():
    app = create_app(repository())
    with BackgroundServer(app, frontend="native") as server:
        pipeline = (infer_bytes(text(["1"], "one")) + b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n"
                    + infer_bytes(text(["2"], "two")) + b"GET /v2/models/speller HTTP/1.1\r\nHost: x\r\n\r\n"
                    + infer_bytes(text(["x"], "three")))
        out = raw_exchange(server.port, pipeline, half_close=True)
        assert out.count(b"HTTP/1.1 200") == 4 and out.count(b"HTTP/1.1 400") == 1
        assert out.index(b'"id":"one"') < out.index(b'"id":"two"') < out.index(b"HTTP/1.1 400")  # (in order)
        slow = raw_exchange(server.port, infer_bytes(text(["3"], "slow")), pause=0.01)
        assert b"HTTP/1.1 200" in slow and b'"data":["three"]' in slow
        go_on = raw_exchange(server.port, infer_bytes(text(["4"], "expect"), "Expect: 100-continue\r\n"))
        assert go_on.startswith(b"HTTP/1.1 100 Continue") and b'"data":["four"]' in go_on
        assert raw_exchange(server.port, b"NOT HTTP AT ALL\r\n\r\n").startswith(b"HTTP/1.1 400")
        assert httpx.get(f"{server.url}/v2/health/live").status_code == 200


def test_garbage_and_cut_requests_fuzzed_for_a_bounded_time_leave_a_well_formed_client_correct():
    app = create_app(repository(), max_body_bytes=1 << 14)
    rng = random.Random(11)
    binary_body, binary_headers = binary([("text", "BYTES", [1], texts_raw(["8"]))], "b")
    seeds = [infer_bytes(text(["12"], "f")), infer_bytes(text(["12"], "f"), "Expect: 100-continue\r\n"),
             b"GET /v2/models/speller/ready HTTP/1.1\r\nHost: x\r\n\r\n",
             (f"POST /v2/models/speller/infer HTTP/1.1\r\nHost: x\r\n{HEADER_LENGTH}: {binary_headers[HEADER_LENGTH]}"
              f"\r\nContent-Length: {len(binary_body)}\r\n\r\n").encode() + binary_body]
    stop, errors = threading.Event(), []
    with BackgroundServer(app, frontend="native") as server:
        def well_formed():
            with httpx.Client(base_url=server.url, timeout=30) as http:
                n = 0
                while not stop.is_set():
                    n = (n + 7919) % (MAX_NUMBER + 1)
                    out = http.post("/v2/models/speller/infer", json=text([str(n)])).json()["outputs"][2]["data"]
                    if out != [decode_words(SPELLER.translate(np.array(encode_number(str(n))), 16))]:
                        errors.append(n)

        checker = threading.Thread(target=well_formed)
        checker.start()
        deadline = time.time() + 8
        sent = 0
        while time.time() < deadline:
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randint(1, 6)):
                if not data:
                    break
                op, at = rng.random(), rng.randrange(len(data))
                if op < 0.4:
                    data[at] = rng.randrange(256)
                elif op < 0.6:
                    del data[at:at + rng.randint(1, 20)]
                elif op < 0.8:
                    data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 20)))
                else:
                    data = data[:at]  # cut short
            try:
                raw_exchange(server.port, bytes(data), half_close=rng.random() < 0.5, read_s=0.5)
            except OSError:
                pass
            sent += 1
        stop.set()
        checker.join(60)
        assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
    assert sent > 50 and not errors
