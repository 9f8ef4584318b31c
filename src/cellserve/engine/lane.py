"""The step of a stream lane: what a native front end (server/native/lanes.cpp) calls once per engine step for
every session message it took, so that no Python runs per message.

A lane serves an imported streaming graph (Silero VAD and its kind: front, recurrent core, head) whose
sessions send one input of [chunks, samples] and keep `context` samples of it between chunks. The front end
holds the sessions (flat state, input context), batches the messages whose sessions are idle, and hands
them here as arrays: the front runs once over every chunk of the step, the core once per chunk position
over the step's sessions (a message's chunks run in order), the head once over every chunk. Results equal
the engine's native stream runner (NativeStreamRunner), which stays the reference and serves everything a
lane does not take.
"""

from __future__ import annotations

import time

import numpy as np

from cellserve.engine.frames import CONTEXT, NativeStreamRunner


class StreamStep:
    """step(x [n, c, context + samples], counts [n], state [n, width]) -> (outputs [n, c, ...], state,
    seconds in the model's kernels): n messages of up to c chunks (message i has counts[i]; the rest is
    padding), each chunk after its context. Steps may run at once on several threads (nothing is kept)."""

    def __init__(self, family, runner: NativeStreamRunner, input_name: str, samples: int, outputs: list[dict]):
        self.model, self.rnn = family.model, family.model.rnn
        self.input, self.samples = input_name, samples  # samples: what a client sends per chunk
        self.context = int(family.context.get(input_name, 0))
        self.outputs = outputs  # the graph outputs a session gets: {"name", "rest"} (dims after the batch axis)
        self.parts = runner._parts  # (state name, start, end) in a session's flat state, as the native loop has it
        self.width = self.parts[-1][2]
        self.cells = [[(a, b) for name, a, b in self.parts if name in layer] for layer in runner.names]

    @classmethod
    def of(cls, family, runner, policy: str) -> "StreamStep | str":
        """The lane step of a served model, or why it has none."""
        model = getattr(family, "model", None)
        if getattr(family, "arch", None) != "onnx" or not getattr(family, "stateful", False):
            return "not a streaming imported graph"
        if not isinstance(runner, NativeStreamRunner) or not runner.merges_chunks or policy != "cellular":
            return "not on the native step loop with cellular batching and blocks of one frame"
        if family.decode or model._lengths is not None or model._head is None:
            return "decoding, sequence lengths or no head"
        state_inputs = {p["input"] for p in model.state_pairs}
        sent = [i for i in model.inputs if i["name"] not in state_inputs]
        if len(sent) != 1:
            return "clients send more than one input"
        spec = sent[0]
        shape = family._client_shape(spec)
        if (spec["datatype"] != "FP32" or spec["batch_axis"] != 0 or spec["time_axis"] is not None or len(shape) != 2
                or shape[1] < 1):
            return f"input {spec['name']!r} is not FP32 [chunks, samples]"
        front_inputs = {i.name for i in model._front.get_inputs()} if model._front else set()
        core = {o["name"] for o in model.spec["core_outputs"]}
        if not front_inputs <= {spec["name"]} or not set(model._head_feeds) <= core | {spec["name"]}:
            return "the front or head reads more than the chunk"
        heads = {o.name for o in model._head.get_outputs()}
        outputs = []
        for o in model.outputs:
            if o["name"] in family.session_hidden:
                continue
            rest = o["shape"][1:]
            if o["name"] not in heads or o["datatype"] != "FP32" or o["batch_axis"] != 0 or any(d < 1 for d in rest):
                return f"output {o['name']!r} is not an FP32 head output of fixed shape after its batch axis"
            outputs.append({"name": o["name"], "rest": list(rest)})
        return cls(family, runner, spec["name"], shape[1], outputs)

    def __call__(self, x: np.ndarray, counts: np.ndarray, state: np.ndarray) -> tuple[list[np.ndarray], np.ndarray,
                                                                                      float]:
        n, c, row = x.shape
        rows = x.reshape(n * c, row)  # message i's chunk k is row i * c + k
        start = time.perf_counter()
        frames = self.model.front_stacked({self.input: rows})  # [T, n * c, F]
        kernel = time.perf_counter() - start
        t = frames.shape[0]
        frames = frames.reshape(t, n, c, -1)
        cells = [tuple(np.ascontiguousarray(state[:, a:b]) for a, b in cell) for cell in self.cells]
        ys, finals, final = [], [], np.empty_like(state)
        core_start = time.perf_counter()
        for k in range(c):  # the core over chunk position k of every message
            y, cells = self.rnn.forward(np.ascontiguousarray(frames[:, :, k]), cells)
            ys.append(y)
            finals.append(cells)
            done = counts == k + 1
            if done.any():
                final[done] = np.concatenate([s for cell in cells for s in cell], axis=1)[done]
        kernel += time.perf_counter() - core_start
        ys = np.stack(ys, axis=2).reshape(t, n * c, -1)  # [T, n * c, H], rows as above
        by_row = [tuple(np.stack([f[l][j] for f in finals], axis=1).reshape(n * c, -1) for j in range(len(cell)))
                  for l, cell in enumerate(self.cells)]
        head_start = time.perf_counter()
        values = self.model.head_stacked({self.input: rows}, ys, by_row, [o["name"] for o in self.outputs])
        kernel += time.perf_counter() - head_start
        outputs = [np.ascontiguousarray(v, np.float32).reshape(n, c, *o["rest"]) for v, o in zip(values, self.outputs)]
        return outputs, final, kernel

    def snapshot(self, x: np.ndarray, count: int, state: np.ndarray) -> dict:
        """A session's snapshot after its message (x [c, row], count chunks; state its flat state then), as
        the engine's stream runners make it (engine/frames.py)."""
        values = {name: state[a:b].copy() for name, a, b in self.parts}
        if self.context:
            values[CONTEXT + self.input] = x[count - 1, -self.context:].copy()
        return {"state": values, "pending": np.zeros((0, self.rnn.input_size), np.float32)}
