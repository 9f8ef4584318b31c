"""What every recurrent cell offers the models and the engine.

A cell holds weights only. State lives outside it, as a tuple of (batch, width) float32 arrays whose
first entry is the output h, so the engine can keep any cell's state in one pool and gather/scatter
rows by slot. `step` runs one time step on a batch; `steps` runs T steps of one batch, which cells
use to compute every input projection of the T steps in one matrix product.
"""

from __future__ import annotations

import numpy as np

State = tuple[np.ndarray, ...]


def f32(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def random_tensors(shapes: dict, hidden_size: int, rng) -> dict[str, np.ndarray]:
    """Weights drawn like torch's default init: U(-1/sqrt(H), 1/sqrt(H))."""
    rng = np.random.default_rng(rng)
    bound = 1.0 / np.sqrt(hidden_size)
    return {name: rng.uniform(-bound, bound, shape).astype(np.float32) for name, shape in shapes.items()}


class Cell:
    kind: str = ""

    def __init__(self, input_size: int, hidden_size: int):
        self.input_size = int(input_size)
        self.hidden_size = int(hidden_size)

    # --- state -------------------------------------------------------------------------------
    def state_widths(self) -> tuple[int, ...]:
        """Width of each state array; the first is h (the cell's output)."""
        return (self.hidden_size,)

    def zero_state(self, batch: int) -> State:
        return tuple(np.zeros((batch, w), dtype=np.float32) for w in self.state_widths())

    # --- compute -----------------------------------------------------------------------------
    def step(self, x: np.ndarray, state: State) -> State:
        """One time step: x (B, input_size) -> the new state; new_state[0] is h."""
        ys, new_state = self.steps(x[None], state)
        return new_state

    def step_into(self, x: np.ndarray, state: State) -> None:
        """One time step that overwrites `state` (views into an engine's persistent batch) in place."""
        for view, value in zip(state, self.step(x, state)):
            view[...] = value

    def steps(self, xs: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """T time steps of one batch: xs (T, B, input_size) -> (hs (T, B, H), final state)."""
        raise NotImplementedError

    @staticmethod
    def project(weight, xs: np.ndarray) -> np.ndarray:
        """The input projections of all T steps in one product, so the weights are read once:
        xs (T, B, in) -> (T, B, out)."""
        steps, batch, _ = xs.shape
        flat = np.ascontiguousarray(xs, dtype=np.float32).reshape(steps * batch, -1)
        return weight(flat).reshape(steps, batch, -1)

    # --- weights -----------------------------------------------------------------------------
    def options(self) -> dict:
        """Architecture options beyond the sizes (saved in the model header)."""
        return {}

    def tensors(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    @classmethod
    def from_tensors(cls, input_size: int, hidden_size: int, tensors: dict, **options) -> "Cell":
        raise NotImplementedError

    @classmethod
    def random(cls, input_size: int, hidden_size: int, rng: np.random.Generator | int = 0, **options) -> "Cell":
        shapes = cls.tensor_shapes(input_size, hidden_size, **options)
        return cls.from_tensors(input_size, hidden_size, random_tensors(shapes, hidden_size, rng), **options)

    @classmethod
    def tensor_shapes(cls, input_size: int, hidden_size: int, **options) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    @property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors().values())
