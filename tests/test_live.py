"""The live page at `/` and its JSON at `/api/live`, without a browser (test_browser.py drives the page in
headless Chromium): figures that follow the engine's own counters, rows per step, sessions, percentiles,
the window, restriction as statistics."""

import numpy as np
import pytest
from fastapi.testclient import TestClient

from cellserve.models import LanguageModel, RNN
from cellserve.server.app import create_app
from cellserve.server.auth import parse_restriction
from cellserve.server.live import LATENCY_EDGES, percentile
from cellserve.server.repository import ModelConfig, Repository, serve_model

VOCAB = 30
LM = LanguageModel.random(VOCAB, 8, 12, num_layers=2, seed=1)
STREAM = RNN.random("sru", 6, 10, num_layers=2, seed=4)


def repository():
    return Repository([serve_model("lm", LM, ModelConfig(max_batch=8)),
                       serve_model("stream", STREAM, ModelConfig(block_steps=3))])


def lm_body(rows):
    tokens = np.random.default_rng(rows).integers(0, VOCAB, (rows, 6))
    return {"inputs": [{"name": "tokens", "shape": [rows, 6], "datatype": "INT64", "data": tokens.reshape(-1).tolist()}]}


def test_the_live_figures_follow_the_engines_counters():
    app = create_app(repository())
    with TestClient(app) as client:
        view = app.state.backend.live_view
        view.sample()
        for rows in (1, 3, 5, 2):
            assert client.post("/v2/models/lm/infer", json=lm_body(rows)).status_code == 200
        opened = client.post("/v2/models/stream/infer", json={
            "inputs": [{"name": "frames", "shape": [2, 6], "datatype": "FP32", "data": [0.5] * 12}],
            "parameters": {"sequence_id": 7, "sequence_start": True}})
        assert opened.status_code == 200, opened.text
        view.sample()
        live = client.get("/api/live").json()
    lm, stream = live["models"]["lm"], live["models"]["stream"]
    engine = app.state.backend.repository.get("lm").engine
    assert lm["window"]["completed"] == engine.stats.completed == 11  # engine requests: one per row
    assert lm["window"]["steps"] == sum(engine.stats.batch_sizes.values()) > 0
    steps = {int(size): n for size, n in lm["rows_per_step"]["lm"].items()}
    assert sum(steps.values()) == lm["window"]["steps"] and max(steps) <= 8
    assert lm["window"]["mean_rows_per_step"] == pytest.approx(sum(s * n for s, n in steps.items()) / sum(steps.values()))
    assert lm["window"]["occupancy"] == pytest.approx(lm["window"]["mean_rows_per_step"] / 8)
    assert 0 < lm["window"]["p50_ms"] <= lm["window"]["p99_ms"]
    assert sum(lm["series"]["throughput_rps"]) == 11 and lm["policy"] == "cellular" and lm["max_batch"] == 8
    assert stream["sessions"] == 1 and stream["series"]["sessions"][-1] == 1


def test_the_window_keeps_only_its_seconds_and_a_percentile_is_within_a_bin():
    app = create_app(repository())
    with TestClient(app) as client:
        view = app.state.backend.live_view
        assert client.post("/v2/models/lm/infer", json=lm_body(2)).status_code == 200
        view.sample()
        for sample in view.series["lm"].samples:
            sample["time"] -= 120  # as if two minutes ago
        assert client.post("/v2/models/lm/infer", json=lm_body(1)).status_code == 200
        view.sample()
        assert client.get("/api/live?window=60").json()["models"]["lm"]["window"]["completed"] == 1
        assert client.get("/api/live?window=300").json()["models"]["lm"]["window"]["completed"] == 3
        assert client.get("/api/live?window=0").status_code == 400
    latencies = np.random.default_rng(0).lognormal(np.log(0.003), 0.5, 5000)
    histogram = np.histogram(latencies, LATENCY_EDGES)[0]
    for q in (50, 99):
        assert percentile(histogram, q) == pytest.approx(np.percentile(latencies, q), rel=0.07)


def test_the_page_links_metrics_and_docs_and_its_figures_are_restricted_as_statistics():
    app = create_app(repository(), restricted=(parse_restriction("statistics:admin-key=s3"),))
    with TestClient(app) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'href="/metrics"' in page.text and 'href="/docs"' in page.text and "/api/live" in page.text
        assert client.get("/api/live").status_code == 401
        assert client.get("/api/live", headers={"admin-key": "s3"}).status_code == 200


def test_the_grafana_dashboard_queries_only_metrics_and_labels_we_export():
    """docs/grafana-dashboard.json: every series it asks for is one /metrics serves, with those labels."""
    import json
    import re
    from pathlib import Path

    dashboard = json.loads((Path(__file__).parent.parent / "docs" / "grafana-dashboard.json").read_text())
    with TestClient(create_app(repository())) as client:
        assert client.post("/v2/models/lm/infer", json=lm_body(2)).status_code == 200
        assert client.post("/v2/models/lm/infer", json={"inputs": []}).status_code == 400
        text = client.get("/metrics").text
    labels: dict[str, set] = {}
    for name, label_text in re.findall(r"^([a-z_]+)\{([^}]*)\}", text, re.M):
        labels.setdefault(name, set()).update(re.findall(r'([a-z_]+)="', label_text))
    for line in re.findall(r"^([a-z_]+) ", text, re.M):
        labels.setdefault(line, set())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10 and {p["type"] for p in dashboard["panels"]} == {"timeseries", "heatmap"}
    for expr in exprs:
        assert expr.count("(") == expr.count(")"), expr
        for metric in re.findall(r"cellserve_[a-z_]+", expr):
            assert metric in labels, f"{metric} is not on /metrics"
            used = set(re.findall(r'([a-z_]+)(?:=~|!=|=)"', expr)) | {
                label.strip() for group in re.findall(r"by \(([^)]*)\)", expr) for label in group.split(",")}
            assert used <= labels[metric] | {"le"} or not used, (metric, used - labels[metric])
    model_query = dashboard["templating"]["list"][1]["query"]["query"]
    assert re.search(r"label_values\((cellserve_[a-z_]+), model\)", model_query)[1] in labels
