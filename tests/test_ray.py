"""Ray Serve scale-out: a local Ray instance, 2 engine shards, sessions on both, each sticking to one."""

import socket

import numpy as np
import pytest

from cellserve.server.ray_serve import merge_metrics, sequence_key

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")


def test_sequence_key_and_metric_merging():
    assert sequence_key(b'{"parameters": {"sequence_id": 12}}', None) == ("12", False)
    assert sequence_key(b'{"parameters": {"sequence_id": "a", "sequence_restore": true}}', None) == ("a", True)
    assert sequence_key(b'{"inputs": []}', None) == (None, False)
    assert sequence_key(b"not json", None) == (None, False)
    merged = merge_metrics(["# HELP a_total x\n# TYPE a_total counter\na_total{model=\"m\"} 1.0\n",
                            "# HELP a_total x\n# TYPE a_total counter\na_total{model=\"m\"} 2.0\n"])
    assert merged.count("# HELP a_total") == 1
    assert 'a_total{replica="0",model="m"} 1.0' in merged and 'a_total{replica="1",model="m"} 2.0' in merged


def test_two_shards_serve_sessions_that_stick():
    import httpx

    from cellserve.models import RNN
    from cellserve.server.ray_serve import build

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build(None, replicas=2), name="cellserve", route_prefix="/")
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
            restore_after_shard_death(client, reference, rng)
            bad = client.post("/v2/models/sru-stream/infer", content=b"{oops")
            assert bad.status_code == 400 and "JSON" in bad.json()["error"]
            metrics = client.get("/metrics").text
            assert 'replica="0"' in metrics and 'replica="1"' in metrics
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
