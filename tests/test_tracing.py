"""OpenTelemetry traces, captured with the SDK's in-memory exporter: one server span per request, child of
the client's W3C traceparent (HTTP header or gRPC metadata), with parse, queue, step and respond children
whose attributes say the cell type and batch size (on the native step loop, exactly the steps the request's
rows took part in); nothing is gathered when tracing is off."""

import numpy as np
import pytest
import tritonclient.grpc as tritonclient
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cellserve.models import LanguageModel, Seq2Seq
from cellserve.server import tracing
from cellserve.server.app import create_app
from cellserve.server.background import BackgroundServer
from cellserve.server.repository import ModelConfig, Repository, serve_model

VOCAB = 30
LM = LanguageModel.random(VOCAB, 8, 12, num_layers=2, seed=1)
S2S = Seq2Seq.random(VOCAB, VOCAB, 8, 12, seed=2)
TRACE_ID, PARENT_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    tracing.configure(exporter, processor=SimpleSpanProcessor)
    yield exporter
    tracing.configure(None)


def repository():
    return Repository([serve_model("lm", LM, ModelConfig()), serve_model("s2s", S2S, ModelConfig())])


def tokens(rows, length=6):
    data = np.arange(rows * length).reshape(rows, length) % VOCAB
    return {"name": "tokens", "shape": [rows, length], "datatype": "INT64", "data": data.reshape(-1).tolist()}


def tree(finished):
    """{request span: [children]} of the exported spans."""
    roots = [s for s in finished if s.name.startswith("infer ")]
    return {root: [s for s in finished if s.parent is not None and s.parent.span_id == root.context.span_id]
            for root in roots}


def test_an_http_request_is_a_server_span_under_the_clients_traceparent(spans):
    with TestClient(create_app(repository())) as client:
        res = client.post("/v2/models/lm/infer", json={"inputs": [tokens(3)], "id": "t1"},
                          headers={"traceparent": TRACEPARENT})
        assert res.status_code == 200
        assert client.post("/v2/models/nope/infer", json={"inputs": [tokens(1)]}).status_code == 404
    (root, children), (failed, failed_children) = tree(spans.get_finished_spans()).items()
    assert format(root.context.trace_id, "032x") == TRACE_ID and format(root.parent.span_id, "016x") == PARENT_ID
    assert root.kind.name == "SERVER" and root.name == "infer lm"
    assert dict(root.attributes) == {"cellserve.request_id": "t1", "cellserve.model": "lm", "cellserve.protocol": "http",
                                     "cellserve.rows": 3, "http.response.status_code": 200}
    names = [c.name for c in children]
    assert names[:2] == ["parse", "queue"] and names[-1] == "respond" and set(names[2:-1]) == {"step"}
    steps = [c for c in children if c.name == "step"]
    assert 6 <= len(steps) <= 18  # 3 rows of 6 tokens: each row takes part in 6 steps, together or apart
    assert sum(s.attributes["cellserve.batch_size"] for s in steps) >= 18
    assert all(s.attributes["cellserve.cell_type"] == "lm" and 1 <= s.attributes["cellserve.batch_size"] <= 3
               for s in steps)
    for child in children:  # inside the request, in order
        assert root.start_time <= child.start_time <= child.end_time <= root.end_time
    assert [c.start_time for c in children] == sorted(c.start_time for c in children)
    # a refused request: its own trace (no traceparent), the status, no engine children
    assert failed.parent is None and failed.attributes["http.response.status_code"] == 404 and not failed_children


def test_grpc_metadata_carries_the_traceparent_and_seq2seq_steps_name_their_cell_type(spans, grpc_frontend):
    app = create_app(repository(), grpc_port=0)
    with BackgroundServer(app):
        client = tritonclient.InferenceServerClient(url=f"127.0.0.1:{app.state.grpc_port}")
        inp = tritonclient.InferInput("tokens", [1, 5], "INT64")
        inp.set_data_from_numpy(np.array([[3, 4, 5, 6, 7]], np.int64))
        client.infer("s2s", [inp], request_id="g1", headers={"traceparent": TRACEPARENT})
        client.close()
    ((root, children),) = tree(spans.get_finished_spans()).items()
    assert format(root.parent.span_id, "016x") == PARENT_ID and root.attributes["cellserve.protocol"] == "grpc"
    kinds = [c.attributes["cellserve.cell_type"] for c in children if c.name == "step"]
    assert kinds.count("encoder") == 5 and kinds.count("decoder") >= 1  # 5 tokens in, then the output tokens
    assert kinds.index("decoder") > len(kinds) - 1 - kinds[::-1].index("encoder")  # encoder steps come first


def test_when_tracing_is_off_no_marks_or_steps_are_gathered(spans):
    """Off (or not sampled), a request costs the tracing code a check: the backend gathers no marks or steps."""
    import asyncio

    from cellserve.server.backend import LocalBackend
    from cellserve.server.protocol import parse_infer_request
    from cellserve.server.telemetry import observed_infer

    backend = LocalBackend(repository())
    backend.start()
    request = parse_infer_request(b'{"inputs": [%s]}' % str(tokens(1)).replace("'", '"').encode(), None)

    def timing():
        return asyncio.run(observed_infer(backend, "lm", request, None, "http", lambda r: r.timing))[0]

    try:
        on = timing()
        tracing.configure(None)
        off = timing()
    finally:
        backend.stop()
    assert set(off) == {"rows", "parse_s", "queue_s", "compute_s"}
    assert {"clock_offset", "parsed_at", "started_at", "done_at", "steps"} <= set(on) and len(on["steps"]) >= 6


def test_a_ratio_samples_requests_without_a_parent_and_follows_a_sampled_parent():
    exporter = InMemorySpanExporter()
    tracing.configure(exporter, processor=SimpleSpanProcessor, ratio=1e-9)
    try:
        with TestClient(create_app(repository())) as client:
            for _ in range(5):
                assert client.post("/v2/models/lm/infer", json={"inputs": [tokens(1)]}).status_code == 200
            assert client.post("/v2/models/lm/infer", json={"inputs": [tokens(1)]},
                               headers={"traceparent": TRACEPARENT}).status_code == 200
    finally:
        tracing.configure(None)
    roots = [s for s in exporter.get_finished_spans() if s.name == "infer lm"]
    assert len(roots) == 1 and format(roots[0].parent.span_id, "016x") == PARENT_ID
    with pytest.raises(ValueError):
        tracing.configure(InMemorySpanExporter(), ratio=0)
