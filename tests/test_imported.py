"""Serving your own model: torch modules exported to ONNX, split around their LSTM/GRU core, served over
HTTP with concurrent requests of mixed lengths, against ONNX Runtime running the original whole graph;
sessions on a streaming graph; clear errors for graphs that do not fit; the Triton repository layout."""

import concurrent.futures
import threading

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from cellserve import models  # noqa: E402
from cellserve.cli import main  # noqa: E402
from cellserve.interop.onnx_import import import_onnx  # noqa: E402
from cellserve.cells.onnxruntime import ort_session  # noqa: E402
from cellserve.interop.torch_import import module_to_onnx  # noqa: E402
from cellserve.server.app import create_app  # noqa: E402
from cellserve.server.background import BackgroundServer  # noqa: E402
from cellserve.server.repository import ModelConfig, Repository, load_folder, serve_model  # noqa: E402

VOCAB, FEATS = 50, 16


class SentimentClassifier(nn.Module):
    """Embedding -> BiLSTM -> Linear on both directions' final states."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.rnn = nn.LSTM(8, 12, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(24, 3)

    def forward(self, tokens):
        _, (h, _) = self.rnn(self.emb(tokens))
        return self.fc(torch.cat([h[-2], h[-1]], dim=1))


class Tagger(nn.Module):
    """Embedding -> 2-layer BiLSTM -> a tag per token."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.rnn = nn.LSTM(8, 10, num_layers=2, batch_first=True, bidirectional=True)
        self.out = nn.Linear(20, 5)

    def forward(self, tokens):
        y, _ = self.rnn(self.emb(tokens))
        return self.out(y)


class Acoustic(nn.Module):
    """Conv1d front over (batch, features, time) -> 2-layer GRU (time-major) -> CTC log-probabilities."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(FEATS, 24, 3, padding=1)
        self.rnn = nn.GRU(24, 20, num_layers=2)
        self.head = nn.Linear(20, 11)

    def forward(self, feats):
        x = torch.relu(self.conv(feats)).permute(2, 0, 1)
        y, _ = self.rnn(x)
        return torch.log_softmax(self.head(y), dim=-1)


class WordLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.rnn = nn.LSTM(8, 12, batch_first=True)
        self.out = nn.Linear(12, VOCAB)

    def forward(self, tokens):
        y, _ = self.rnn(self.emb(tokens))
        return self.out(y)


class FrameGRU(nn.Module):
    """A streaming encoder: per-frame projection -> GRU -> per-frame scores."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(FEATS, 12)
        self.rnn = nn.GRU(12, 14, batch_first=True)
        self.out = nn.Linear(14, 6)

    def forward(self, frames):
        y, _ = self.rnn(torch.tanh(self.proj(frames)))
        return self.out(y)


class PackedTagger(nn.Module):
    """Padded batches with their lengths (pack_padded_sequence): the export's LSTMs take sequence_lens."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.rnn = nn.LSTM(8, 10, num_layers=2, batch_first=True, bidirectional=True)
        self.cls = nn.Linear(20, 3)
        self.tag = nn.Linear(20, 4)

    def forward(self, tokens, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(self.emb(tokens), lengths, batch_first=True, enforce_sorted=False)
        y, (h, _) = self.rnn(packed)
        y, _ = nn.utils.rnn.pad_packed_sequence(y, batch_first=True)
        return self.cls(torch.cat([h[-2], h[-1]], dim=1)), self.tag(y)


def exported(module_cls, seed=0):
    torch.manual_seed(seed)
    inputs = [("tokens", "int64", ["batch", "time"]), ("lengths", "int64", ["batch"])] \
        if module_cls is PackedTagger else None
    return module_to_onnx(module_cls().eval(), inputs)


def token_request(rng, n):
    return {"tokens": rng.integers(0, VOCAB, (1, n)).astype(np.int64)}


def acoustic_request(rng, n):
    return {"feats": rng.standard_normal((1, FEATS, n)).astype(np.float32)}


def frame_request(rng, n):
    return {"input": rng.standard_normal((1, n, FEATS)).astype(np.float32)}


def padded_request(rng, n):
    """A row padded past its length with junk ids."""
    return {"tokens": rng.integers(0, VOCAB, (1, n)).astype(np.int64),
            "lengths": rng.integers(1, n + 1, 1).astype(np.int64)}


MODELS = {  # name: (module, its input's name in the export, request maker)
    "classifier": (SentimentClassifier, token_request),
    "tagger": (Tagger, token_request),
    "acoustic": (Acoustic, acoustic_request),
    "lm": (WordLM, token_request),
    "frames": (FrameGRU, frame_request),
    "packed": (PackedTagger, padded_request),
}


def rename_input(graph: bytes, old: str, new: str) -> bytes:
    model = onnx.load_from_string(graph)
    for node in model.graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
    for i in model.graph.input:
        if i.name == old:
            i.name = new
    return model.SerializeToString()


@pytest.fixture(scope="module")
def graphs():
    out = {name: exported(cls, seed=i) for i, (name, (cls, _)) in enumerate(MODELS.items())}
    out["acoustic"] = rename_input(out["acoustic"], "input", "feats")
    return out


@pytest.fixture(scope="module")
def server(graphs):
    served = [serve_model(name, import_onnx(graph), ModelConfig(max_batch=8, block_steps=2 if name == "acoustic" else 1))
              for name, graph in graphs.items()]
    app = create_app(Repository(served), grpc_port=0)
    with BackgroundServer(app) as background:
        yield background


def as_json(name, array):
    datatype = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}[array.dtype]
    return {"name": name, "shape": list(array.shape), "datatype": datatype, "data": array.reshape(-1).tolist()}


def infer(url, model, feeds, parameters=None):
    body = {"inputs": [as_json(k, v) for k, v in feeds.items()]}
    if parameters:
        body["parameters"] = parameters
    reply = httpx.post(f"{url}/v2/models/{model}/infer", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    return {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in reply.json()["outputs"]}


@pytest.mark.parametrize("name", list(MODELS))
def test_imported_model_served_over_http_equals_onnxruntime_on_the_whole_graph(name, graphs, server):
    """Concurrent requests of mixed lengths (and one with two rows) give what ONNX Runtime computes running
    the original graph on each request alone."""
    make = MODELS[name][1]
    rng = np.random.default_rng(7)
    requests = [make(rng, int(n)) for n in rng.integers(1, 30, 12)]
    pair = make(rng, 9)
    requests.append({k: np.concatenate([v, make(rng, 9)[k]]) for k, v in pair.items()})  # two rows, one call
    whole = ort_session(onnx.load_from_string(graphs[name]))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda feeds: infer(server.url, name, feeds), requests))
    for feeds, got in zip(requests, replies):
        for spec, want in zip(whole.get_outputs(), whole.run(None, feeds)):
            np.testing.assert_allclose(got[spec.name], want, rtol=1e-4, atol=1e-5)


def test_metadata_names_the_graphs_tensors(graphs, server):
    meta = httpx.get(f"{server.url}/v2/models/acoustic").json()
    assert meta["inputs"] == [{"name": "feats", "datatype": "FP32", "shape": [-1, FEATS, -1]}]
    assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, -1, 11]}]
    tokens = httpx.get(f"{server.url}/v2/models/classifier").json()
    assert tokens["inputs"] == [{"name": "tokens", "datatype": "INT64", "shape": [-1, -1]}]


def test_streaming_graph_serves_sessions_equal_to_one_pass(graphs, server):
    """Three chunks of one sequence, with the GRU's state carried by the session, give the whole graph's
    output on the full sequence."""
    rng = np.random.default_rng(3)
    frames = frame_request(rng, 23)["input"]
    chunks, got = np.split(frames, [5, 16], axis=1), []
    for i, chunk in enumerate(chunks):
        params = {"sequence_id": 42, "sequence_start": i == 0, "sequence_end": i == len(chunks) - 1}
        got.append(infer(server.url, "frames", {"input": chunk}, params)["output"])
    want = ort_session(onnx.load_from_string(graphs["frames"])).run(None, {"input": frames})[0]
    np.testing.assert_allclose(np.concatenate(got, axis=1), want, rtol=1e-4, atol=1e-5)
    classifier = httpx.post(f"{server.url}/v2/models/classifier/infer", json={
        "inputs": [as_json("tokens", np.zeros((1, 3), np.int64))], "parameters": {"sequence_id": 1}})
    assert classifier.status_code == 400 and "stateless" in classifier.json()["error"]


def test_a_streaming_graph_in_blocks_says_how_many_frames_wait(graphs):
    """With 4-frame blocks, frames short of a block wait for the next chunk, and each reply says how many
    (as our own stream models do); the chunks still give one pass."""
    from fastapi.testclient import TestClient

    served = serve_model("frames", import_onnx(graphs["frames"]), ModelConfig(block_steps=4))
    frames = frame_request(np.random.default_rng(4), 13)["input"]
    got, pending = [], []
    with TestClient(create_app(Repository([served]))) as client:
        for i, chunk in enumerate(np.split(frames, [5, 11], axis=1)):
            reply = client.post("/v2/models/frames/infer", json={
                "inputs": [as_json("input", chunk)],
                "parameters": {"sequence_id": 7, "sequence_start": i == 0, "sequence_end": i == 2}})
            assert reply.status_code == 200, reply.text
            output = reply.json()["outputs"][0]
            got.append(np.array(output["data"]).reshape(output["shape"]))
            pending.append(reply.json()["parameters"]["frames_pending"])
    assert pending == [1, 3, 0]  # 5 frames: 4 run, 1 waits; 1 + 6: 4 run, 3 wait; the end runs the rest
    want = ort_session(onnx.load_from_string(graphs["frames"])).run(None, {"input": frames})[0]
    np.testing.assert_allclose(np.concatenate(got, axis=1), want, rtol=1e-4, atol=1e-5)


def test_bad_requests_are_400_naming_the_problem(server):
    cases = [({"tokens": np.zeros((1, 4), np.float32)}, "must be INT64"),
             ({"tokens": np.full((1, 4), VOCAB + 3, np.int64)}, "outside [0, 50)"),
             ({"feats": np.zeros((1, 4), np.float32)}, "unknown input"),
             ({"tokens": np.zeros((1, 4, 2), np.int64)}, "must have shape")]
    cases = [("classifier", feeds, message) for feeds, message in cases]
    cases.append(("packed", {"tokens": np.zeros((1, 4), np.int64), "lengths": np.array([5])}, "outside [1, 4]"))
    for model, feeds, message in cases:
        reply = httpx.post(f"{server.url}/v2/models/{model}/infer",
                           json={"inputs": [as_json(k, v) for k, v in feeds.items()]})
        assert reply.status_code == 400 and message in reply.json()["error"], reply.text
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200


def test_ctc_and_lm_decoding_add_an_output(graphs):
    from cellserve.families.imported import ImportedFamily

    acoustic = ImportedFamily(import_onnx(graphs["acoustic"]), decode="ctc")
    feeds = acoustic_request(np.random.default_rng(0), 17)
    out = acoustic.forward(feeds)
    best = out["output"][:, 0].argmax(-1)
    expected = [int(b) for i, b in enumerate(best) if b != 0 and (i == 0 or b != best[i - 1])]
    assert out["labels"][0].tolist() == expected
    lm = ImportedFamily(import_onnx(graphs["lm"]), decode="lm")
    tokens = token_request(np.random.default_rng(1), 8)
    logits = torch.from_numpy(lm.forward(tokens)["output"][0])
    expected = torch.log_softmax(logits, -1)[torch.arange(7), torch.from_numpy(tokens["tokens"][0, 1:])].sum()
    np.testing.assert_allclose(lm.forward(tokens)["log_likelihood"], [float(expected)], rtol=1e-5)


def test_imported_model_saves_loads_and_quantizes(graphs, tmp_path):
    from cellserve.compress.quantize import quantize_cells

    model = import_onnx(graphs["tagger"])
    feeds = token_request(np.random.default_rng(5), 11)
    loaded = models.load(models.save(model, tmp_path / "tagger.safetensors"))
    np.testing.assert_array_equal(loaded.forward(feeds)["output"], model.forward(feeds)["output"])
    quantize_cells(loaded.rnn.cells, 8)
    np.testing.assert_allclose(loaded.forward(feeds)["output"], model.forward(feeds)["output"], atol=0.05)


def lstm_graph(between: str | None, op: str = "LSTM") -> onnx.ModelProto:
    """x [T, B, 4] -> two recurrent layers (hidden 3), with `between` applied between them."""
    rng = np.random.default_rng(0)
    gates = 4 if op == "LSTM" else 1
    inits, nodes = [], []
    x = "x"
    for layer, size in enumerate((4, 3)):
        names = [f"W{layer}", f"R{layer}"]
        inits += [numpy_helper.from_array(rng.standard_normal((1, gates * 3, s)).astype(np.float32), n)
                  for n, s in zip(names, (size, 3))]
        nodes.append(helper.make_node(op, [x] + names, [f"Y{layer}"], hidden_size=3, name=f"rnn{layer}"))
        inits.append(numpy_helper.from_array(np.array([1], np.int64), f"axis{layer}"))
        nodes.append(helper.make_node("Squeeze", [f"Y{layer}", f"axis{layer}"], [f"S{layer}"]))
        x = f"S{layer}"
        if between and layer == 0:
            inits.append(numpy_helper.from_array(np.array(2.0, np.float32), "two"))
            nodes.append(helper.make_node(between, [x, "two"], ["scaled"], name="scale"))
            x = "scaled"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "B", 4])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["T", "B", 3])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_graphs_that_do_not_fit_get_an_error_naming_the_operator(tmp_path, capsys):
    assert import_onnx(lstm_graph(None)).rnn.num_layers == 2
    with pytest.raises(ValueError, match=r"operator Mul \(node 'scale'\) lies between recurrent layers 0 and 1"):
        import_onnx(lstm_graph("Mul"))
    with pytest.raises(ValueError, match="operator RNN .* is a recurrence cellserve does not run"):
        import_onnx(lstm_graph(None, op="RNN"))
    path = tmp_path / "bad.onnx"
    onnx.save(lstm_graph("Mul"), path)
    assert main(["import-onnx", str(path), str(tmp_path / "out.safetensors")]) == 2
    assert "Mul" in capsys.readouterr().err


def test_import_torch_takes_a_pickled_module_and_a_factory(tmp_path, capsys):
    torch.manual_seed(0)
    module = FrameGRU().eval()
    torch.save(module, tmp_path / "whole.pt")
    assert main(["import-torch", str(tmp_path / "whole.pt"), str(tmp_path / "a.safetensors")]) == 0
    assert "streams (sessions)" in capsys.readouterr().out
    imported = models.load(tmp_path / "a.safetensors")
    frames = frame_request(np.random.default_rng(0), 7)
    with torch.no_grad():
        want = module(torch.from_numpy(frames["input"])).numpy()
    np.testing.assert_allclose(imported.forward(frames)["output"], want, rtol=1e-4, atol=1e-5)
    assert main(["import-torch", "test_imported:Tagger", str(tmp_path / "b.safetensors")]) == 0
    torch.save(nn.Sequential(nn.Embedding(5, 3)).state_dict(), tmp_path / "sd.pt")
    assert main(["import-torch", str(tmp_path / "sd.pt"), str(tmp_path / "c.safetensors")]) == 2
    assert "Import the whole module" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    assert main(["import-torch", str(tmp_path / "junk.pt"), str(tmp_path / "d.safetensors")]) == 2
    # a module pickled from a script: its class lived in that script's __main__, absent here
    script_class = type("ScriptTagger", (Tagger,), {"__module__": "__main__"})
    import __main__
    __main__.ScriptTagger = script_class
    try:
        torch.save(script_class(), tmp_path / "script.pt")
    finally:
        del __main__.ScriptTagger
    capsys.readouterr()
    assert main(["import-torch", str(tmp_path / "script.pt"), str(tmp_path / "e.safetensors")]) == 2
    assert "TorchScript" in capsys.readouterr().err
    torch.jit.script(Tagger().eval()).save(str(tmp_path / "scripted.pt"))
    assert main(["import-torch", str(tmp_path / "scripted.pt"), str(tmp_path / "f.safetensors")]) == 0


def test_triton_layout_loads_versions_and_config_pbtxt(graphs, tmp_path):
    folder = tmp_path / "acoustic"
    for version, seed in (("1", 0), ("2", 1)):
        (folder / version).mkdir(parents=True)
        (folder / version / "model.onnx").write_bytes(rename_input(exported(Acoustic, seed), "input", "feats"))
    (folder / "config.pbtxt").write_text('''
name: "acoustic"
platform: "onnxruntime_onnx"
max_batch_size: 16
input [ { name: "feats" data_type: TYPE_FP32 dims: [ 16, -1 ] } ]
output [ { name: "output" data_type: TYPE_FP32 dims: [ -1, 11 ] } ]
dynamic_batching { max_queue_delay_microseconds: 2000 }
parameters { key: "block_steps" value { string_value: "4" } }
''')
    served = load_folder(folder)
    assert (served.version, served.versions) == ("2", ["1", "2"])
    assert (served.config.max_batch, served.config.block_steps, served.config.max_delay_ms) == (16, 4, 2.0)
    assert served.model_config()["max_batch_size"] == 16
    feeds = acoustic_request(np.random.default_rng(0), 10)
    want = ort_session(onnx.load_from_string((folder / "2" / "model.onnx").read_bytes())).run(None, feeds)[0]
    np.testing.assert_allclose(served.model.forward(feeds)["output"], want, rtol=1e-4, atol=1e-5)
    served.engine.stop()
    (folder / "config.pbtxt").write_text('input [ { name: "feats" data_type: TYPE_FP32 dims: [ 1, 20, 40 ] } ]')
    with pytest.raises(ValueError, match="dims"):
        load_folder(folder)
    (folder / "config.pbtxt").write_text('version_policy { specific { versions: [ 1 ] } }')
    assert load_folder(folder).version == "1"


def test_a_classifier_of_our_own_is_served(tmp_path):
    from fastapi.testclient import TestClient

    classifier = models.Classifier.random(20, 6, 8, num_classes=4, bidirectional=True, seed=0)
    (tmp_path / "sentiment").mkdir()
    models.save(classifier, tmp_path / "sentiment" / "model.safetensors")
    with TestClient(create_app(Repository.from_directory(tmp_path))) as client:
        meta = client.get("/v2/models/sentiment").json()
        assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 4]}]
        tokens = np.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
        reply = client.post("/v2/models/sentiment/infer", json={"inputs": [as_json("tokens", tokens)]}).json()
        got = np.array(reply["outputs"][0]["data"]).reshape(2, 4)
    np.testing.assert_allclose(got, classifier.forward(tokens.T), rtol=1e-5, atol=1e-6)


def test_the_graphs_front_and_head_count_as_the_models_compute_not_engine_overhead(graphs):
    """bench serving's overhead is the engine's own work per step: the time an imported graph's front and
    head spend in ONNX Runtime on the engine's thread is the model's, counted with the cells' as kernel
    time. (Fronts run on the submitting thread count for neither.)"""
    import threading
    import time

    from cellserve.engine import Engine
    from cellserve.families import make_runner

    model = import_onnx(graphs["acoustic"])
    on_engine = []

    class Slow:  # each ONNX Runtime call 5 ms longer, so its share outweighs the cells'
        def __init__(self, session):
            self.session = session

        def __getattr__(self, name):  # get_inputs and the rest
            return getattr(self.session, name)

        def run(self, names, feeds):
            start = time.perf_counter()
            time.sleep(0.005)
            try:
                return self.session.run(names, feeds)
            finally:
                if threading.current_thread() is not threading.main_thread():
                    on_engine.append(time.perf_counter() - start)

    for name in ("_front", "_head", "_lengths", "_states"):
        if getattr(model, name) is not None:
            setattr(model, name, Slow(getattr(model, name)))
    runner = make_runner(model, 256, step_loop="python")  # (the native loop runs the head outside its steps)
    engine = Engine(runner, "cellular", max_batch=8).start()
    rng = np.random.default_rng(5)
    [f.result(timeout=60) for f in [engine.submit(acoustic_request(rng, 12)) for _ in range(20)]]
    engine.stop()
    assert on_engine and runner.kernel_seconds > sum(on_engine)  # the cells' time on top of ONNX Runtime's
    assert engine.stats.overhead_s < engine.stats.step_s - sum(on_engine)
