"""Stacked recurrent networks, uni- or bidirectional, over any cell type."""

from __future__ import annotations

import numpy as np

from cellserve.cells import CELLS, Cell, State


def prefixed(prefix: str, tensors: dict) -> dict:
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def unprefixed(prefix: str, tensors: dict) -> dict:
    start = prefix + "."
    return {k[len(start):]: v for k, v in tensors.items() if k.startswith(start)}


def rnns_of(model) -> list:
    """The recurrent stacks inside a model (an RNN itself, or its rnn / encoder / decoder)."""
    if isinstance(model, RNN):
        return [model]
    return [getattr(model, n) for n in ("rnn", "encoder", "decoder") if isinstance(getattr(model, n, None), RNN)]


class RNN:
    """layers[l][d]: the cell of layer l, direction d (0 forward, 1 backward)."""

    arch = "rnn"

    def __init__(self, layers: list[list[Cell]]):
        if not layers or len({len(dirs) for dirs in layers}) != 1 or len(layers[0]) not in (1, 2):
            raise ValueError("RNN needs >= 1 layer, each with 1 or 2 directions")
        self.layers = layers
        first = layers[0][0]
        self.cell_kind = first.kind
        self.input_size = first.input_size
        self.hidden_size = first.hidden_size
        self.num_layers = len(layers)
        self.num_directions = len(layers[0])
        self.bidirectional = self.num_directions == 2
        self.output_size = self.hidden_size * self.num_directions

    @property
    def cells(self) -> list[Cell]:
        return [cell for dirs in self.layers for cell in dirs]

    def zero_state(self, batch: int) -> list[State]:
        """One state per (layer, direction), in `cells` order."""
        return [cell.zero_state(batch) for cell in self.cells]

    def forward(self, xs: np.ndarray, state: list[State] | None = None) -> tuple[np.ndarray, list[State]]:
        """xs (T, B, input_size) -> (ys (T, B, output_size), final states). Sequences are full length."""
        xs = np.ascontiguousarray(xs, dtype=np.float32)
        state = state if state is not None else self.zero_state(xs.shape[1])
        finals: list[State] = []
        for l, dirs in enumerate(self.layers):
            outs = []
            for d, cell in enumerate(dirs):
                s = state[l * self.num_directions + d]
                if d == 0:
                    ys, s = cell.steps(xs, s)
                else:
                    ys, s = cell.steps(np.ascontiguousarray(xs[::-1]), s)
                    ys = ys[::-1]
                outs.append(ys)
                finals.append(s)
            xs = outs[0] if len(outs) == 1 else np.ascontiguousarray(np.concatenate(outs, axis=-1))
        return xs, finals

    def step(self, x: np.ndarray, state: list[State]) -> tuple[np.ndarray, list[State]]:
        """One time step of a unidirectional stack: x (B, input_size) -> (h of the top layer, states)."""
        if self.bidirectional:
            raise ValueError("a bidirectional RNN needs the whole sequence; it cannot be stepped")
        new_state = []
        for cell, s in zip(self.cells, state):
            s = cell.step(x, s)
            new_state.append(s)
            x = s[0]
        return x, new_state

    @property
    def weight_bytes(self) -> int:
        return sum(c.weight_bytes for c in self.cells)

    def config(self) -> dict:
        return {"arch": self.arch, "cell": self.cell_kind, "input_size": self.input_size,
                "hidden_size": self.hidden_size, "num_layers": self.num_layers,
                "bidirectional": self.bidirectional, "options": self.layers[0][0].options()}

    def tensors(self) -> dict:
        out = {}
        for l, dirs in enumerate(self.layers):
            for d, cell in enumerate(dirs):
                out.update(prefixed(f"layers.{l}.{d}", cell.tensors()))
        return out

    @classmethod
    def from_tensors(cls, config: dict, tensors: dict) -> "RNN":
        cell_cls = CELLS[config["cell"]]
        dirs = 2 if config.get("bidirectional") else 1
        layers = []
        for l in range(config["num_layers"]):
            in_size = config["input_size"] if l == 0 else config["hidden_size"] * dirs
            layers.append([cell_cls.from_tensors(in_size, config["hidden_size"], unprefixed(f"layers.{l}.{d}", tensors),
                                                 **config.get("options", {})) for d in range(dirs)])
        return cls(layers)

    @classmethod
    def random(cls, cell: str, input_size: int, hidden_size: int, num_layers: int = 1,
               bidirectional: bool = False, seed: int = 0, **options) -> "RNN":
        rng = np.random.default_rng(seed)
        dirs = 2 if bidirectional else 1
        layers = [[CELLS[cell].random(input_size if l == 0 else hidden_size * dirs, hidden_size, rng, **options)
                   for _ in range(dirs)] for l in range(num_layers)]
        return cls(layers)
