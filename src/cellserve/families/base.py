"""What every model family gives the server and the engine: the tensors it takes and returns (names,
datatypes, shapes, as Triton describes them), the codec between those tensors and engine requests, and
its runner. A family knows nothing of HTTP, gRPC, statistics or model names: server/served.py puts a
family behind the protocol."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from cellserve.engine.runner import Runner


@dataclass
class TensorSpec:
    name: str
    datatype: str
    shape: list[int]
    optional: bool = False

    def metadata(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": self.shape}


SNAPSHOT = TensorSpec("sequence_snapshot", "BYTES", [1], optional=True)  # a stateful model's session state


class Family:
    """One model family. Subclasses set `arch` (the model files' architecture they serve), `inputs` and
    `outputs`, and `options` (the model config keys their constructor takes)."""

    arch = ""
    options: tuple[str, ...] = ()
    stateful = False  # serves sessions (sequence_id): its inputs and outputs include SNAPSHOT
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []

    def __init__(self, model):
        self.model = model

    def runner(self, capacity: int, block_steps: int = 1, step_loop: str = "native") -> Runner:
        """The runner for this model. step_loop: native where the family has a native loop for the model
        (engine/steploop.py), else its Python runner; python always the Python runner (the reference)."""
        raise NotImplementedError

    def requests(self, tensors: dict[str, np.ndarray]) -> list[dict]:
        """A request's input tensors as engine requests (one per batch row). ValueError names what is wrong."""
        raise NotImplementedError

    def outputs_of(self, results: list) -> dict[str, np.ndarray]:
        """The engine's results (one per row) as output tensors."""
        raise NotImplementedError

    def lane_spec(self, runner: Runner) -> dict | None:
        """What a native front end needs to take this family's stateless requests into `runner`'s native step
        loop and answer them without Python (server/native/token_lanes.cpp: the stage, EOS, the default
        output length, a text codec's native form), or None where it cannot."""
        return None

    @functools.cached_property
    def _input_names(self) -> tuple[frozenset, list]:
        """(every input's name, the required ones'): checked on every request."""
        return frozenset(s.name for s in self.inputs), [s.name for s in self.inputs if not s.optional]

    def check_names(self, tensors: dict) -> None:
        known, required = self._input_names
        unknown = set(tensors) - known
        if unknown:
            raise ValueError(f"unknown input(s) {sorted(unknown)}; the model takes {sorted(known)}")
        missing = [name for name in required if name not in tensors]
        if missing:
            raise ValueError(f"the model needs input(s) {missing}")


def check_float(array: np.ndarray, name: str) -> None:
    if array.dtype not in (np.float32, np.float64, np.float16):
        raise ValueError(f"input {name!r} must be FP32, got {array.dtype}")


def token_rows(array: np.ndarray, name: str) -> np.ndarray:
    """A [batch, length] view of a token tensor given as [length] or [batch, length]."""
    if array.dtype.kind not in "iu":
        raise ValueError(f"input {name!r} must be an integer tensor (INT32/INT64), got {array.dtype}")
    if array.ndim == 1:
        return array[None]
    if array.ndim != 2:
        raise ValueError(f"input {name!r} must have shape [length] or [batch, length], got {list(array.shape)}")
    return array
