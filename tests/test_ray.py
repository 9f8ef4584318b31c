"""Ray Serve scale-out: a local Ray instance, 2 engine shards, sessions on both, each sticking to one, over
HTTP through the ingress and over gRPC through the same router protocol."""

import asyncio
import concurrent.futures
import json
import socket
import threading
import time

import numpy as np
import pytest

from cellserve.server.protocol import InferRequest
from cellserve.server.ray_serve import merge_metrics, sequence_key

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")


def test_sequence_key_and_metric_merging():
    def request(parameters):
        return InferRequest(None, parameters, {})

    assert sequence_key(request({"sequence_id": 12})) == ("12", False)
    assert sequence_key(request({"sequence_id": "a", "sequence_restore": True})) == ("a", True)
    assert sequence_key(request({})) == (None, False)
    merged = merge_metrics(["# HELP a_total x\n# TYPE a_total counter\na_total{model=\"m\"} 1.0\n",
                            "# HELP a_total x\n# TYPE a_total counter\na_total{model=\"m\"} 2.0\n"])
    assert merged.count("# HELP a_total") == 1
    assert 'a_total{replica="0",model="m"} 1.0' in merged and 'a_total{replica="1",model="m"} 2.0' in merged


def test_two_shards_serve_sessions_that_stick(tmp_path):
    import httpx

    from cellserve.models import RNN
    from cellserve.server.ray_serve import build

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        spans = tmp_path / "spans.jsonl"  # the launcher's --trace, which the replicas must apply themselves
        serve.run(build(None, replicas=2, telemetry={"log_level": "warning", "log_format": "json",
                                                     "trace": f"file={spans}", "trace_ratio": 1.0}),
                  name="cellserve", route_prefix="/")
        reference = RNN.random("sru", 40, 256, num_layers=2, seed=0)  # the embedded sru-stream model
        rng = np.random.default_rng(0)
        seen = set()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            assert client.get("/v2/health/ready").status_code == 200
            for sid in range(8):
                frames = rng.standard_normal((10, 40)).astype(np.float32)
                outputs, replicas = [], set()
                for i, (a, b) in enumerate([(0, 5), (5, 10)]):
                    body = {"inputs": [{"name": "frames", "shape": [b - a, 40], "datatype": "FP32",
                                        "data": frames[a:b].reshape(-1).tolist()}],
                            "parameters": {"sequence_id": f"user-{sid}", "sequence_start": i == 0,
                                           "sequence_end": b == 10}}
                    res = client.post("/v2/models/sru-stream/infer", json=body)
                    assert res.status_code == 200, res.text
                    out = res.json()
                    replicas.add(out["parameters"]["replica"])
                    outputs.append(np.array(out["outputs"][0]["data"]).reshape(out["outputs"][0]["shape"]))
                assert len(replicas) == 1  # both chunks on one shard
                seen |= replicas
                np.testing.assert_allclose(np.concatenate(outputs), reference.forward(frames[:, None])[0][:, 0],
                                           rtol=1e-5, atol=1e-5)
            assert seen == {0, 1}  # sessions landed on both shards
            grpc_through_the_router(reference, rng)
            restore_after_shard_death(client, reference, rng)
            bad = client.post("/v2/models/sru-stream/infer", content=b"{oops")
            assert bad.status_code == 400 and "JSON" in bad.json()["error"]
            metrics = client.get("/metrics").text
            assert 'replica="0"' in metrics and 'replica="1"' in metrics
            live = client.get("/api/live").json()["models"]  # the live page's figures, per replica
            assert {"sru-stream (replica 0)", "sru-stream (replica 1)"} <= set(live)
        deadline = time.time() + 30  # the ingress replica's span processor exports every few seconds
        while not (spans.exists() and '"infer sru-stream"' in spans.read_text()) and time.time() < deadline:
            time.sleep(0.5)
        roots = [json.loads(line) for line in spans.read_text().splitlines() if '"infer sru-stream"' in line]
        assert roots and all(r["attributes"]["cellserve.protocol"] == "http" for r in roots)
    finally:
        serve.shutdown()
        ray.shutdown()


def restore_after_shard_death(client, reference, rng):
    """A session snapshotted on its shard resumes elsewhere after that shard is killed: outputs equal an
    uninterrupted run."""
    frames = rng.standard_normal((12, 40)).astype(np.float32)

    def chunk(a, b, **parameters):
        return {"inputs": [{"name": "frames", "shape": [b - a, 40], "datatype": "FP32",
                            "data": frames[a:b].reshape(-1).tolist()}],
                "parameters": {"sequence_id": "survivor", **parameters}}

    first = client.post("/v2/models/sru-stream/infer", json=chunk(0, 6, sequence_start=True, sequence_snapshot=True))
    assert first.status_code == 200, first.text
    body = first.json()
    blob = next(o for o in body["outputs"] if o["name"] == "sequence_snapshot")["data"][0]
    shard = body["parameters"]["replica"]
    actors = [a for a in ray.util.list_named_actors(all_namespaces=True)
              if f"cellserve-shard-{shard}" in a["name"] and "REPLICA" in a["name"]]
    assert actors, ray.util.list_named_actors(all_namespaces=True)
    for actor in actors:
        ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=False)
    restore = chunk(6, 12, sequence_restore=True, sequence_end=True)
    restore["inputs"].append({"name": "sequence_snapshot", "shape": [1], "datatype": "BYTES", "data": [blob]})
    rest = client.post("/v2/models/sru-stream/infer", json=restore)
    assert rest.status_code == 200, rest.text
    outputs = [np.array(r.json()["outputs"][0]["data"]).reshape(r.json()["outputs"][0]["shape"]) for r in (first, rest)]
    np.testing.assert_allclose(np.concatenate(outputs), reference.forward(frames[:, None])[0][:, 0],
                               rtol=1e-5, atol=1e-5)


def grpc_through_the_router(reference, rng):
    """tritonclient.grpc against the gRPC service over a ShardRouter: a session's chunks stick to one shard
    and equal an uninterrupted run; stateless requests reach both shards."""
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from cellserve.server.grpc_service import start_grpc
    from cellserve.server.ray_serve import shard_router

    router = shard_router("cellserve", 2)
    loop = asyncio.new_event_loop()
    started = concurrent.futures.Future()

    def run():
        asyncio.set_event_loop(loop)
        started.set_result(loop.run_until_complete(start_grpc(lambda: router, "127.0.0.1", 0)))
        loop.run_forever()

    threading.Thread(target=run, daemon=True).start()
    server, port = started.result(60)
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.is_server_ready()
        frames = rng.standard_normal((10, 40)).astype(np.float32)
        outputs, replicas = [], set()
        for i, (a, b) in enumerate([(0, 5), (5, 10)]):
            chunk = grpcclient.InferInput("frames", [b - a, 40], "FP32")
            chunk.set_data_from_numpy(frames[a:b])
            result = client.infer("sru-stream", [chunk], sequence_id="grpc-user", sequence_start=i == 0,
                                  sequence_end=b == 10)
            outputs.append(result.as_numpy("outputs"))
            replicas.add(result.get_response().parameters["replica"].int64_param)
        assert len(replicas) == 1
        np.testing.assert_allclose(np.concatenate(outputs), reference.forward(frames[:, None])[0][:, 0],
                                   rtol=1e-5, atol=1e-5)
        seen = set()
        for _ in range(4):
            chunk = grpcclient.InferInput("frames", [3, 40], "FP32")
            chunk.set_data_from_numpy(frames[:3])
            seen.add(client.infer("sru-stream", [chunk]).get_response().parameters["replica"].int64_param)
        assert seen == {0, 1}  # round-robin over the shards
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)

