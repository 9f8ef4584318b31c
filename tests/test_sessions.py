"""Stateful streaming in the engine: chunks of a session carry state, run in order, in blocks of k frames,
and sessions expire when idle."""

import time

import numpy as np
import pytest

from cellserve.engine import Engine
from cellserve.families import make_runner
from cellserve.engine.request import SessionError
from cellserve.models import RNN


def full_run(rnn, frames):
    ys, _ = rnn.forward(frames[:, None, :])
    return ys[:, 0]


@pytest.mark.parametrize("kind,block,step_loop", [("sru", 4, "python"), ("sru", 4, "native"), ("qrnn", 3, "python"),
                                                  ("qrnn", 3, "native"), ("lstm", 1, "native"), ("gru", 2, "native"),
                                                  ("lstm", 3, "python"), ("gru", 2, "python")])
def test_chunked_session_equals_one_pass(kind, block, step_loop):
    options = {"window": 2} if kind == "qrnn" else {}
    rnn = RNN.random(kind, 6, 10, num_layers=2, seed=1, **options)
    engine = Engine(make_runner(rnn, 16, block_steps=block, step_loop=step_loop), "cellular", max_batch=8).start()
    assert engine.step_loop == step_loop
    rng = np.random.default_rng(0)
    frames = rng.standard_normal((37, 6)).astype(np.float32)
    cuts = [0, 5, 6, 13, 14, 30, 37]
    outputs, pending = [], []
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        res = engine.submit({"frames": frames[a:b]}, sequence_id="s1", sequence_start=i == 0,
                            sequence_end=b == 37).result(timeout=30)
        outputs.append(res["outputs"])
        pending.append(res["frames_pending"])
    engine.stop()
    got = np.concatenate(outputs)
    np.testing.assert_allclose(got, full_run(rnn, frames), rtol=1e-5, atol=1e-6)
    assert pending[-1] == 0 and all(p < block for p in pending)
    assert engine.runner.used == 0 and engine.sessions == 0


def test_interleaved_sessions_batch_together_and_stay_separate():
    rnn = RNN.random("sru", 5, 8, num_layers=2, seed=2)
    engine = Engine(make_runner(rnn, 64, block_steps=2), "cellular", max_batch=16).start()
    rng = np.random.default_rng(1)
    streams = {f"user{i}": rng.standard_normal((int(rng.integers(2, 30)), 5)).astype(np.float32) for i in range(12)}
    futures = {sid: [] for sid in streams}
    for step in range(30):  # every stream sends its next chunk of 3 frames without waiting for answers
        for sid, frames in streams.items():
            a = 3 * step
            if a < len(frames):
                end = a + 3 >= len(frames)
                futures[sid].append(engine.submit({"frames": frames[a:a + 3]}, sid, a == 0, end))
    for sid, frames in streams.items():
        got = np.concatenate([f.result(timeout=30)["outputs"] for f in futures[sid]])
        np.testing.assert_allclose(got, full_run(rnn, frames), rtol=1e-5, atol=1e-6)
    assert max(size for (_, size) in engine.stats.batch_sizes) > 1
    engine.stop()


def test_unknown_expired_and_restarted_sessions():
    rnn = RNN.random("gru", 4, 6, seed=3)
    engine = Engine(make_runner(rnn, 4), "cellular", idle_timeout_s=0.2).start()
    chunk = {"frames": np.ones((2, 4), np.float32)}
    with pytest.raises(SessionError, match="sequence_start"):
        engine.submit(chunk, sequence_id="nobody")
    first = engine.submit(chunk, "a", sequence_start=True).result(timeout=10)["outputs"]
    engine.submit(chunk, "a").result(timeout=10)
    deadline = time.time() + 5
    while engine.sessions and time.time() < deadline:
        time.sleep(0.05)
    assert engine.sessions == 0 and engine.runner.used == 0  # expired, slot freed
    with pytest.raises(SessionError, match="expired"):
        engine.submit(chunk, "a")
    again = engine.submit(chunk, "a", sequence_start=True).result(timeout=10)["outputs"]
    np.testing.assert_array_equal(again, first)  # a restart begins from zero state
    engine.stop()


def test_bad_frames_rejected_and_session_survives():
    rnn = RNN.random("lstm", 3, 4, seed=4)
    engine = Engine(make_runner(rnn, 4)).start()
    engine.submit({"frames": np.zeros((1, 3))}, "s", sequence_start=True).result(timeout=10)
    for bad in [np.zeros((2, 4)), np.array([[np.nan, 0, 0]]), np.zeros(3)]:
        with pytest.raises(ValueError):
            engine.submit({"frames": bad}, "s")
    assert engine.submit({"frames": np.zeros((1, 3))}, "s", sequence_end=True).result(timeout=10)["outputs"].shape == (1, 4)
    engine.stop()
