"""The stream RNN family: feature frames in, the top layer's output per frame back. With sequence
parameters a request is one chunk of a stream whose state the server holds between chunks (in blocks of
`block_steps` frames: SRU/QRNN read their weights once per block)."""

from __future__ import annotations

import numpy as np

from cellserve.engine.frames import frames_runner
from cellserve.families.base import SNAPSHOT, Family, TensorSpec, check_float
from cellserve.models import RNN


class StreamFamily(Family):
    arch = "rnn"
    stateful = True

    def __init__(self, model: RNN):
        super().__init__(model)
        self.rnn = model
        self.inputs = [TensorSpec("frames", "FP32", [-1, model.input_size], optional=True), SNAPSHOT]
        self.outputs = [TensorSpec("outputs", "FP32", [-1, model.hidden_size]), SNAPSHOT]

    def runner(self, capacity, block_steps=1, step_loop="native"):
        return frames_runner(self, capacity, block_steps, step_loop)

    def requests(self, tensors):
        self.check_names(tensors)
        frames = tensors.get("frames")
        if frames is None:
            if "sequence_snapshot" not in tensors:
                raise ValueError("the model needs input 'frames'")
            frames = np.zeros((0, self.rnn.input_size), np.float32)
        check_float(frames, "frames")
        if frames.ndim == 3 and frames.shape[0] == 1:
            frames = frames[0]
        return [{"frames": frames}]

    def frames_of(self, inputs: dict) -> np.ndarray:
        """A request's frames (T, input_size), checked; ValueError says what is wrong."""
        frames = np.asarray(inputs.get("frames"), dtype=np.float32)
        if frames.ndim != 2 or frames.shape[1] != self.rnn.input_size:
            raise ValueError(f"frames must have shape [T, {self.rnn.input_size}], got {list(frames.shape)}")
        if not np.isfinite(frames).all():
            raise ValueError("frames contain NaN or infinity")
        return frames

    def result_of(self, inputs: dict, ys: np.ndarray, finals: list) -> dict:
        return {"outputs": ys}

    def outputs_of(self, results):
        (result,) = results
        return {"outputs": result["outputs"]}
