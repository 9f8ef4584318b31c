"""What the server tells its operator: access lines over HTTP and gRPC, a failure's traceback under its
request id while the client gets a clean message, model loads and unloads with their time, JSON lines."""

import io
import json
import logging

import numpy as np
import pytest
import tritonclient.grpc as tritonclient
from fastapi.testclient import TestClient

from cellserve.models import LanguageModel, save
from cellserve.server.app import create_app
from cellserve.server.background import BackgroundServer
from cellserve.server.repository import ModelConfig, Repository, serve_model
from cellserve.server.telemetry import configure_logs

VOCAB = 30
LM = LanguageModel.random(VOCAB, 8, 12, num_layers=2, seed=1)


def lm_body(rows=2, **extra):
    tokens = np.arange(rows * 5).reshape(rows, 5) % VOCAB
    return {"inputs": [{"name": "tokens", "shape": list(tokens.shape), "datatype": "INT64",
                        "data": tokens.reshape(-1).tolist()}], **extra}


def access_lines(caplog):
    return [r.fields for r in caplog.records if r.name == "cellserve.access"]


def test_each_http_request_gets_one_access_line_with_its_timings(caplog):
    caplog.set_level(logging.INFO)
    with TestClient(create_app(Repository([serve_model("lm", LM, ModelConfig())]))) as client:
        ok = client.post("/v2/models/lm/infer", json=lm_body(3, id="mine"))
        named = client.post("/v2/models/lm/infer", json=lm_body(1), headers={"X-Request-ID": "from-header"})
        bad = client.post("/v2/models/lm/infer", json={"inputs": []})
        unknown = client.post("/v2/models/nope/infer", json=lm_body(1))
    assert (ok.status_code, named.status_code, bad.status_code, unknown.status_code) == (200, 200, 400, 404)
    assert ok.headers["x-request-id"] == "mine" and named.headers["x-request-id"] == "from-header"
    lines = access_lines(caplog)
    assert [(f["request_id"], f["model"], f["protocol"], f["status"]) for f in lines[:2]] == [
        ("mine", "lm", "http", 200), ("from-header", "lm", "http", 200)]
    assert lines[0]["rows"] == 3 and lines[1]["rows"] == 1
    assert 0 < lines[0]["compute_ms"] <= lines[0]["total_ms"] and lines[0]["queue_ms"] >= 0
    assert [(f["model"], f["status"]) for f in lines[2:]] == [("lm", 400), ("nope", 404)]
    assert all(len(f["request_id"]) == 16 for f in lines[2:])  # a generated id where the client gave none


def test_grpc_requests_are_logged_alike(grpc_frontend):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    access = logging.getLogger("cellserve.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        app = create_app(Repository([serve_model("lm", LM, ModelConfig())]), grpc_port=0)
        with BackgroundServer(app):
            client = tritonclient.InferenceServerClient(url=f"127.0.0.1:{app.state.grpc_port}")
            tokens = tritonclient.InferInput("tokens", [2, 4], "INT64")
            tokens.set_data_from_numpy(np.arange(8, dtype=np.int64).reshape(2, 4))
            client.infer("lm", [tokens], request_id="g1", headers={"x-request-id": "g1-header"})
            client.infer("lm", [tokens], request_id="g2")
            client.close()
    finally:
        access.removeHandler(handler)
        access.setLevel(logging.NOTSET)
    fields = [r.fields for r in records]
    assert [(f["request_id"], f["protocol"], f["rows"], f["status"]) for f in fields] == [
        ("g1-header", "grpc", 2, 200), ("g2", "grpc", 2, 200)]


def test_a_failure_is_logged_with_its_traceback_and_the_client_gets_a_clean_message(caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    served = serve_model("lm", LM, ModelConfig())

    def broken(results):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(served, "outputs_of", broken)
    with TestClient(create_app(Repository([served]))) as client:
        res = client.post("/v2/models/lm/infer", json=lm_body(1, id="bad-one"))
        after = client.post("/v2/models/nope/infer", json=lm_body(1))  # the server goes on serving
    assert res.status_code == 500 and after.status_code == 404
    message = res.json()["error"]
    assert "bad-one" in message and "secret" not in message and "Traceback" not in message
    failure = next(r for r in caplog.records if r.name == "cellserve.server" and r.exc_info)
    assert failure.fields["request_id"] == "bad-one" and "secret internals" in str(failure.exc_info[1])
    assert access_lines(caplog)[0]["status"] == 500


def test_model_loads_and_unloads_are_logged_with_their_time(caplog, tmp_path):
    caplog.set_level(logging.INFO)
    save(LM, tmp_path / "lm" / "model.safetensors")
    app = create_app(Repository.from_directory(tmp_path), model_control="explicit")
    with TestClient(app) as client:
        assert client.post("/v2/repository/models/lm/load").status_code == 200
        assert client.post("/v2/repository/models/lm/unload").status_code == 200
    messages = [r.getMessage() for r in caplog.records if r.name == "cellserve.repository"]
    loads = [m for m in messages if m.startswith("model lm version 1 loaded in")]
    assert len(loads) == 2 and all("ms (LanguageModel" in m for m in loads)  # at start, and on request
    assert any(m.startswith("model lm version 1 unloaded") for m in messages)


def test_json_lines_carry_the_fields_and_the_traceback():
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.level, list(root.handlers)  # configure_logs replaces the root's handlers (pytest's too)
    configure_logs("info", "json", stream)
    try:
        logging.getLogger("cellserve.access").info("line", extra={"fields": {"request_id": "r1", "status": 200}})
        try:
            raise ValueError("why")
        except ValueError:
            logging.getLogger("cellserve.server").exception("failed")
        logging.getLogger("cellserve.server").debug("not at info")
    finally:
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])
    first, second, *rest = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert not rest
    assert first["message"] == "line" and first["request_id"] == "r1" and first["level"] == "info"
    assert second["level"] == "error" and "ValueError: why" in second["traceback"]
    with pytest.raises(ValueError):
        configure_logs("loud", "text")
