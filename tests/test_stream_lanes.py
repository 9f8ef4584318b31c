"""The native gRPC front end's stream lanes (server/native/lanes.cpp, engine/lane.py): Silero VAD's session
messages are parsed, held, batched and answered natively. Every answer, good or bad, equals the Python
path's byte for byte; sessions, capacity, restores, flow control and drain behave as the engine's do."""

import json
import pathlib
import threading
import time

import grpc
import numpy as np
import pytest

silero_vad = pytest.importorskip("silero_vad")
pytest.importorskip("onnxruntime")
from tritonclient.grpc import service_pb2 as pb  # noqa: E402
from tritonclient.grpc import service_pb2_grpc as pbg  # noqa: E402

from cellserve.server.app import create_app  # noqa: E402
from cellserve.server.background import BackgroundServer  # noqa: E402
from cellserve.server.native import grpc_front  # noqa: E402
from cellserve.server.repository import Repository  # noqa: E402

pytestmark = pytest.mark.skipif(not getattr(grpc_front._grpc_front, "LANES", 0),
                                reason="this build has no native stream lanes (grpc++ or tritonclient missing)")
SILERO = pathlib.Path(silero_vad.__file__).parent / "data" / "silero_vad.onnx"
CHUNK, CONTEXT = 512, 64
METHOD = "/inference.GRPCInferenceService/"


def make_repository(root: pathlib.Path, **config) -> Repository:
    (root / "vad" / "1").mkdir(parents=True, exist_ok=True)
    (root / "vad" / "1" / "model.onnx").write_bytes(SILERO.read_bytes())
    (root / "vad" / "config.json").write_text(json.dumps({
        "controls": {"sr": 16000}, "context": {"input": CONTEXT}, "input_shapes": {"input": [-1, CHUNK + CONTEXT]},
        "max_batch": 16, **config}))
    return Repository.from_directory(root)


def request(chunks, sid, rid="", raw=True, **flags) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="vad", id=rid)
    chunks = np.asarray(chunks, np.float32)
    tensor = message.inputs.add(name="input", datatype="FP32", shape=list(chunks.shape))
    if raw:
        message.raw_input_contents.append(chunks.tobytes())
    else:
        tensor.contents.fp32_contents.extend(chunks.reshape(-1).tolist())
    if isinstance(sid, int):  # (a str or an int id, as clients send)
        message.parameters["sequence_id"].int64_param = sid
    else:
        message.parameters["sequence_id"].string_param = sid
    for key, value in flags.items():
        message.parameters[key].bool_param = value
    return message


def unary(channel, message: pb.ModelInferRequest):
    """The answer, or the status code and details. (Answers compare as messages: a message equals another
    when every field's bytes do, tensors' raw contents included; only the order of a map's entries on the
    wire is left open by protobuf, and C++ and Python order them apart.)"""
    try:
        return pb.ModelInferResponse.FromString(
            channel.unary_unary(METHOD + "ModelInfer")(message.SerializeToString(), timeout=30))
    except grpc.RpcError as exc:
        return exc.code(), exc.details()


def stream(channel, messages) -> list[pb.ModelStreamInferResponse]:
    """A stream's answers by request id (they come as they finish)."""
    call = channel.stream_stream(METHOD + "ModelStreamInfer", response_deserializer=pb.ModelStreamInferResponse.FromString)
    answers = call(iter([m.SerializeToString() for m in messages]), timeout=60)
    return sorted(answers, key=lambda a: a.infer_response.id + a.error_message)


def transcript(root: pathlib.Path, frontend: str, lanes: bool, monkeypatch) -> tuple[list, dict]:
    """Every kind of session message one server answers, in a fixed order: good ones (multi-chunk, int and
    str ids, raw and typed contents, snapshots, restores), bad ones, and a session past capacity."""
    monkeypatch.setenv("CELLSERVE_STREAM_LANES", "1" if lanes else "0")
    rng = np.random.default_rng(0)
    chunks = [rng.standard_normal((k, CHUNK)).astype(np.float32) * 0.1 for k in (3, 1, 5, 2, 3)]
    app = create_app(make_repository(root, max_sessions=3), grpc_port=0, grpc_frontend=frontend)
    out = []
    with BackgroundServer(app), grpc.insecure_channel(f"127.0.0.1:{app.state.grpc_port}") as channel:
        served = app.state.backend.repository.get("vad")
        for sid in ("a", 7):
            for i, x in enumerate(chunks):
                last = i == len(chunks) - 1
                out.append(unary(channel, request(x, sid, f"{sid}{i}", raw=i % 2 == 0, sequence_start=i == 0,
                                                  sequence_end=last, sequence_snapshot=last)))
        snapshot = out[4].raw_output_contents[1]
        restore = request(chunks[1], "r", "restore", sequence_restore=True)
        restore.inputs.add(name="sequence_snapshot", datatype="BYTES", shape=[1])
        restore.raw_input_contents.append(len(snapshot).to_bytes(4, "little") + snapshot)
        out.append(unary(channel, restore))
        out.append(unary(channel, request(chunks[2], "r", "after-restore")))  # the restored session goes on
        out.append(unary(channel, request(chunks[3], "r", "end-restored", sequence_end=True)))
        out.append(stream(channel, [request(x, "s", f"s{i}", sequence_start=i == 0, sequence_end=i == 4)
                                    for i, x in enumerate(chunks)]))
        bad_rows = request(chunks[0][:, :500], "s2", "short", sequence_start=True)
        nan = request(np.full((1, CHUNK), np.nan), "s2", "nan", sequence_start=True)
        out.append(stream(channel, [request(chunks[1], "never-opened", "unknown"), bad_rows, nan,
                                    request(chunks[1], "s2", "ok", sequence_start=True, sequence_end=True)]))
        out.append(unary(channel, request(chunks[1], "never-opened", "unknown")))
        for sid in ("c1", "c2", "c3", "c4"):  # max_sessions is 3: the fourth is refused, none evicted
            out.append(unary(channel, request(chunks[1], sid, sid, sequence_start=True)))
        out.append(unary(channel, request(chunks[1], "c1", "restart", sequence_start=True)))  # an idle restart
        for sid in ("c1", "c2", "c3"):
            out.append(unary(channel, request(chunks[1], sid, sid, sequence_end=True)))
        statistics = pb.ModelStatisticsResponse.FromString(channel.unary_unary(METHOD + "ModelStatistics")(
            pb.ModelStatisticsRequest(name="vad").SerializeToString())).model_stats[0]
        facts = {"success": statistics.inference_stats.success.count, "fail": statistics.inference_stats.fail.count,
                 "inferences": statistics.inference_count, "sessions": served.sessions,
                 "lane_steps": sum(n for (kind, _), n in served.engine.stats.batch_sizes.items() if kind == "lane")}
    return out, facts


def test_lanes_answer_every_message_as_the_python_path_does(tmp_path, monkeypatch):
    lane, lane_facts = transcript(tmp_path / "lane", "native", True, monkeypatch)
    native, native_facts = transcript(tmp_path / "native", "native", False, monkeypatch)
    python, python_facts = transcript(tmp_path / "python", "python", False, monkeypatch)
    assert lane_facts["lane_steps"] > 0 and native_facts["lane_steps"] == python_facts["lane_steps"] == 0
    for other in (native, python):
        assert len(lane) == len(other)
        for i, (a, b) in enumerate(zip(lane, other)):
            assert a == b, f"answer {i} differs"
    del lane_facts["lane_steps"], native_facts["lane_steps"], python_facts["lane_steps"]
    assert lane_facts == native_facts == python_facts
    assert lane_facts["sessions"] == 0
    full = lane[-5]  # the fourth session
    assert full[0] == grpc.StatusCode.UNAVAILABLE and "maximum of 3 open sequences" in full[1]


def test_lane_streams_beside_cut_and_stalled_clients_then_idle_expiry_and_drain(tmp_path):
    """Four unpaced streams (each message one chunk, max_pending_chunks 4) equal ONNX Runtime with state and
    context threaded by hand, while beside them one client stops reading and another vanishes mid-session.
    Their sessions expire after idle_timeout_s; on drain a new session is refused and an open one ends well."""
    from test_overload import unpaced_streams
    from test_silero import CHUNKS, audio, reference

    # idle_timeout_s outlasts the four streams, which take a few seconds under the sanitizers
    app = create_app(make_repository(tmp_path, max_pending_chunks=4, idle_timeout_s=4.0), grpc_port=0,
                     grpc_frontend="native")
    served = app.state.backend.repository.get("vad")
    with BackgroundServer(app):
        address = f"127.0.0.1:{app.state.grpc_port}"
        stalled, cut = grpc.insecure_channel(address), grpc.insecure_channel(address)
        noise = np.random.default_rng(1).standard_normal((1, CHUNK)).astype(np.float32)
        never_read = pbg.GRPCInferenceServiceStub(stalled).ModelStreamInfer(
            iter([request(noise, "stalled", sequence_start=True)] + [request(noise, "stalled")] * 200))
        vanished = pbg.GRPCInferenceServiceStub(cut).ModelStreamInfer(
            iter([request(noise, "cut", sequence_start=True)] + [request(noise, "cut")] * 20))
        next(vanished)
        vanished.cancel()
        samples = np.stack([audio(seed, 16000) for seed in range(4)]).reshape(4, CHUNKS * CHUNK, 1)
        frames = samples.reshape(4, CHUNKS, CHUNK)
        outputs, errors = unpaced_streams(app.state.grpc_port, "vad", frames, frames_per_chunk=1,
                                          input_name="input", output_name="output")
        assert errors == []
        for s in range(4):
            np.testing.assert_allclose(outputs[s][:, 0], reference("silero_vad.onnx", 16000, samples[s, :, 0]),
                                       rtol=1e-4, atol=1e-5)
        assert served.lane_sessions() >= 2  # the stalled and the cut session, until they expire
        stalled.close()
        cut.close()
        deadline = time.time() + 15
        while served.sessions and time.time() < deadline:
            time.sleep(0.1)
        assert served.sessions == 0
        with grpc.insecure_channel(address) as channel:
            assert isinstance(unary(channel, request(noise, "open", "1", sequence_start=True)), pb.ModelInferResponse)
            app.state.backend.begin_drain()
            refused = unary(channel, request(noise, "new", "2", sequence_start=True))
            assert refused[0] == grpc.StatusCode.UNAVAILABLE and "shutting down" in refused[1]
            assert isinstance(unary(channel, request(noise, "open", "3", sequence_end=True)), pb.ModelInferResponse)


def test_a_lane_streams_answers_in_the_order_of_its_messages(tmp_path):
    """The lane's answers are written by the front end's poller from one outbox (grpc_front.cpp Front::post):
    a session's answers on a stream come back in the order its messages went out, whatever the bursts, and
    two sessions sharing a stream keep their own orders."""
    app = create_app(make_repository(tmp_path), grpc_port=0, grpc_frontend="native")
    rng = np.random.default_rng(3)
    messages = []
    for i in range(60):  # two sessions interleaved, one to three chunks a message, sent without waiting
        sid = "even" if i % 2 == 0 else "odd"
        chunks = rng.standard_normal((1 + i % 3, CHUNK)).astype(np.float32) * 0.1
        messages.append(request(chunks, sid, f"{sid}-{i // 2}", sequence_start=i < 2, sequence_end=i >= 58))
    with BackgroundServer(app), grpc.insecure_channel(f"127.0.0.1:{app.state.grpc_port}") as channel:
        call = channel.stream_stream(METHOD + "ModelStreamInfer",
                                     response_deserializer=pb.ModelStreamInferResponse.FromString)
        answers = list(call(iter([m.SerializeToString() for m in messages]), timeout=60))
        channel.unary_unary(METHOD + "ModelStatistics")(pb.ModelStatisticsRequest(name="vad").SerializeToString())
        served = app.state.backend.repository.get("vad")  # (a statistics read records the lane's steps first)
        assert sum(n for (kind, _), n in served.engine.stats.batch_sizes.items() if kind == "lane") > 0
    assert [a.error_message for a in answers] == [""] * 60
    for sid in ("even", "odd"):
        ids = [a.infer_response.id for a in answers if a.infer_response.id.startswith(sid)]
        assert ids == [f"{sid}-{k}" for k in range(30)]
