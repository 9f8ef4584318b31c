"""Import weights from torch's nn.LSTM / nn.GRU / nn.LSTMCell / nn.GRUCell (modules or state dicts).

Only reads tensors; torch itself is needed only when a module (not a plain dict of arrays) is given.
"""

from __future__ import annotations

import re

import numpy as np

from cellserve.cells import GRUCell, LSTMCell
from cellserve.models.rnn import RNN

_KEY = re.compile(r"^(weight|bias)_(ih|hh)(?:_l(\d+))?(_reverse)?$")


def _numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


def rnn_from_torch(source, kind: str | None = None) -> RNN:
    """Build an RNN from a torch module or its state_dict. kind ('lstm'/'gru') is inferred when omitted."""
    state = source.state_dict() if hasattr(source, "state_dict") else source
    groups: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    for key, value in state.items():
        match = _KEY.match(key)
        if not match:
            raise ValueError(f"unsupported torch RNN parameter {key!r} (projections, e.g. proj_size, are not supported)")
        what, side, layer, reverse = match.groups()
        groups.setdefault((int(layer or 0), 1 if reverse else 0), {})[f"{what}_{side}"] = _numpy(value).astype(np.float32)
    if not groups:
        raise ValueError("no RNN weights found")
    hidden = groups[(0, 0)]["weight_hh"].shape[1]
    gates = groups[(0, 0)]["weight_hh"].shape[0] // hidden
    inferred = {4: "lstm", 3: "gru"}.get(gates)
    kind = kind or inferred
    if kind != inferred:
        raise ValueError(f"weights have {gates} gate blocks; that is not a {kind}")
    num_layers = 1 + max(l for l, _ in groups)
    num_dirs = 1 + max(d for _, d in groups)
    layers = []
    for l in range(num_layers):
        dirs = []
        for d in range(num_dirs):
            g = groups[(l, d)]
            zeros = np.zeros(gates * hidden, dtype=np.float32)
            b_ih, b_hh = g.get("bias_ih", zeros), g.get("bias_hh", zeros)
            if kind == "lstm":
                dirs.append(LSTMCell(g["weight_ih"], g["weight_hh"], b_ih + b_hh))
            else:
                dirs.append(GRUCell(g["weight_ih"], g["weight_hh"], b_ih, b_hh))
        layers.append(dirs)
    return RNN(layers)
