"""How each model's requests decompose into cell steps.

A runner owns a model and its state pool. The engine asks it to `start` a request (fill its state slots
and mark its first ready nodes) and to `run` one batched step of one cell type over nodes from many
requests. `pad_rows` adds dummy rows to a step, which is how the graph baseline pays for padding.
Runners know nothing of threads or HTTP.
"""

from __future__ import annotations

import numpy as np

from cellserve.engine.pool import StatePool
from cellserve.engine.request import Request
from cellserve.models import LanguageModel, Seq2Seq, TreeLSTM, tree_levels
from cellserve.models.lm import log_softmax
from cellserve.models.ocr import OCRModel
from cellserve.models.rnn import RNN


def _token_array(value, name: str, vocab: int, min_len: int = 1) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 1 or len(arr) < min_len:
        raise ValueError(f"{name} must be a 1-D list of at least {min_len} token ids, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got {arr.dtype}")
    if arr.min() < 0 or arr.max() >= vocab:
        raise ValueError(f"{name} token ids must be in [0, {vocab}), got {arr.min()}..{arr.max()}")
    return arr.astype(np.int64)


class StackedState:
    """The per-layer state arrays of a stacked RNN inside a pool (names s{layer}_{i})."""

    def __init__(self, rnn: RNN):
        self.rnn = rnn
        self.widths = {f"s{l}_{i}": w for l, cell in enumerate(rnn.cells) for i, w in enumerate(cell.state_widths())}

    def step(self, rnn: RNN, pool: StatePool, slots: np.ndarray, x: np.ndarray, pad_rows: int = 0) -> np.ndarray:
        """One step of `rnn` (encoder or decoder, same shapes) for the rows `slots`; returns top h."""
        return self.steps(rnn, pool, slots, x[None], pad_rows)[0]

    def steps(self, rnn: RNN, pool: StatePool, slots: np.ndarray, xs: np.ndarray, pad_rows: int = 0) -> np.ndarray:
        """T steps, xs (T, B, in), for the rows `slots`: each layer runs all T steps in one call, so SRU and
        QRNN read their weights once per block. Returns the top layer's outputs (T, B + pad_rows, H)."""
        n = len(slots)
        if pad_rows:
            xs = np.concatenate([xs, np.zeros((xs.shape[0], pad_rows, xs.shape[2]), np.float32)], axis=1)
        for l, cell in enumerate(rnn.cells):
            names = [f"s{l}_{i}" for i in range(len(cell.state_widths()))]
            state = tuple(pool[name][slots] for name in names)
            if pad_rows:
                state = tuple(np.concatenate([s, np.zeros((pad_rows, s.shape[1]), np.float32)]) for s in state)
            xs, new = cell.steps(np.ascontiguousarray(xs), state)
            for name, arr in zip(names, new):
                pool[name][slots] = arr[:n]
        return xs


class Runner:
    cell_types: tuple[str, ...] = ()
    pads = True  # sequence models pad finished requests in the graph baseline; trees do not

    def __init__(self, pool: StatePool):
        self.pool = pool

    def prepare(self, inputs: dict) -> tuple[object, int]:
        """Validate inputs; return (payload, number of state slots needed). Raises ValueError."""
        raise NotImplementedError

    def length(self, payload) -> int:
        """The request's size for length bucketing (tokens, source tokens or tree nodes)."""
        return len(payload)

    def start(self, req: Request) -> None:
        raise NotImplementedError

    def run(self, cell_type: str, nodes: list[tuple[Request, object]], pad_rows: int = 0) -> None:
        raise NotImplementedError

    def _finish(self, req: Request, result) -> None:
        req.result = result
        req.done = True
        req.ready.clear()


class LanguageModelRunner(Runner):
    """Scores a token sequence: log-likelihood of tokens[1:] and the predicted next token."""

    cell_types = ("lm",)

    def __init__(self, model: LanguageModel, capacity: int):
        self.model = model
        self.layers = StackedState(model.rnn)
        super().__init__(StatePool(capacity, {**self.layers.widths, "score": 0}, {"score": np.float64}))

    def prepare(self, inputs):
        return _token_array(inputs.get("tokens"), "tokens", self.model.embedding.vocab_size), 1

    def start(self, req):
        req.ready["lm"] = [0]

    def run(self, cell_type, nodes, pad_rows=0):
        reqs = [r for r, _ in nodes]
        slots = np.concatenate([r.slots for r in reqs])
        tokens = np.fromiter((r.payload[t] for r, t in nodes), np.int64, len(nodes))
        top = self.layers.step(self.model.rnn, self.pool, slots, self.model.embedding(tokens), pad_rows)
        logp = log_softmax(self.model.head(top))  # padded rows pay for the head too, as in a padded graph
        score = self.pool["score"]
        for row, (req, t) in enumerate(nodes):
            if t + 1 < len(req.payload):
                score[req.slots[0]] += logp[row, req.payload[t + 1]]
                req.ready["lm"] = [t + 1]
            else:
                self._finish(req, {"log_likelihood": float(score[req.slots[0]]),
                                   "next_token": int(logp[row].argmax())})


class Seq2SeqRunner(Runner):
    """Encoder steps over the source, then greedy decoder steps, as two cell types batched apart."""

    cell_types = ("encoder", "decoder")

    def __init__(self, model: Seq2Seq, capacity: int):
        self.model = model
        self.layers = StackedState(model.encoder)
        super().__init__(StatePool(capacity, {**self.layers.widths, "prev": 0}, {"prev": np.int64}))

    def prepare(self, inputs):
        src = _token_array(inputs.get("tokens"), "tokens", self.model.src_embedding.vocab_size)
        max_len = int(inputs.get("max_output_tokens", 2 * len(src) + 10))
        if not 1 <= max_len <= 4096:
            raise ValueError(f"max_output_tokens must be in [1, 4096], got {max_len}")
        return {"src": src, "max_len": max_len, "stop_at_eos": bool(inputs.get("stop_at_eos", True))}, 1

    def length(self, payload):
        return len(payload["src"])

    def start(self, req):
        req.ready["encoder"] = [0]
        req.progress["out"] = []

    def run(self, cell_type, nodes, pad_rows=0):
        slots = np.concatenate([r.slots for r, _ in nodes])
        if cell_type == "encoder":
            tokens = np.fromiter((r.payload["src"][t] for r, t in nodes), np.int64, len(nodes))
            self.layers.step(self.model.encoder, self.pool, slots, self.model.src_embedding(tokens), pad_rows)
            for req, t in nodes:
                if t + 1 < len(req.payload["src"]):
                    req.ready["encoder"] = [t + 1]
                else:
                    req.ready["encoder"] = []
                    self.pool["prev"][req.slots[0]] = self.model.bos_id
                    req.ready["decoder"] = [0]
            return
        prev = self.pool["prev"][slots]
        top = self.layers.step(self.model.decoder, self.pool, slots, self.model.tgt_embedding(prev), pad_rows)
        next_tokens = self.model.head(top).argmax(axis=-1)[: len(nodes)]
        self.pool["prev"][slots] = next_tokens
        for (req, t), token in zip(nodes, next_tokens):
            out = req.progress["out"]
            out.append(int(token))
            eos = req.payload["stop_at_eos"] and token == self.model.eos_id
            if eos or len(out) >= req.payload["max_len"]:
                self._finish(req, {"tokens": out})
            else:
                req.ready["decoder"] = [t + 1]


class TreeRunner(Runner):
    """Leaves and internal nodes are different cell types; a node is ready once its children are done.
    Every node has its own state slot."""

    cell_types = ("leaf", "internal")
    pads = False

    def __init__(self, model: TreeLSTM, capacity: int):
        self.model = model
        hidden = model.hidden_size
        super().__init__(StatePool(capacity, {"h": hidden, "c": hidden}))

    def prepare(self, inputs):
        parents = np.asarray(inputs.get("parents"))
        if parents.ndim != 1 or not np.issubdtype(parents.dtype, np.integer):
            raise ValueError("parents must be a 1-D list of integer node indices (-1 for the root)")
        levels = tree_levels(parents)
        tokens = _token_array(inputs.get("tokens"), "tokens", self.model.embedding.vocab_size)
        if len(tokens) != len(parents):
            raise ValueError(f"tokens ({len(tokens)}) and parents ({len(parents)}) must have one entry per node")
        children = [[] for _ in parents]
        for node, parent in enumerate(parents):
            if parent >= 0:
                children[parent].append(node)
        payload = {"tokens": tokens, "parents": parents.astype(np.int64), "children": children,
                   "leaves": list(levels[0]), "root": int(np.flatnonzero(parents == -1)[0])}
        return payload, len(parents)

    def length(self, payload):
        return len(payload["parents"])

    def start(self, req):
        req.ready["leaf"] = list(req.payload["leaves"])
        req.ready["internal"] = []
        req.progress["waiting"] = [len(c) for c in req.payload["children"]]

    def run(self, cell_type, nodes, pad_rows=0):
        slots = np.fromiter((r.slots[n] for r, n in nodes), np.int64, len(nodes))
        x = self.model.embedding(np.fromiter((r.payload["tokens"][n] for r, n in nodes), np.int64, len(nodes)))
        if cell_type == "leaf":
            h, c = self.model.cell.nodes(x)
        else:
            child_slots, child_rows = [], []
            for row, (req, n) in enumerate(nodes):
                kids = req.payload["children"][n]
                child_slots.extend(int(req.slots[k]) for k in kids)
                child_rows.extend([row] * len(kids))
            kid = np.array(child_slots, dtype=np.int64)
            h, c = self.model.cell.nodes(x, self.pool["h"][kid], self.pool["c"][kid], np.array(child_rows, np.int64))
        self.pool["h"][slots] = h
        self.pool["c"][slots] = c
        for req, n in nodes:
            req.ready[cell_type].remove(n)
            parent = req.payload["parents"][n]
            if parent < 0:
                root_h = self.pool["h"][req.slots[n]][None]
                self._finish(req, {"logits": self.model.head(root_h)[0].tolist()})
                continue
            req.progress["waiting"][parent] -= 1
            if req.progress["waiting"][parent] == 0:
                req.ready["internal"].append(int(parent))


class StreamRunner(Runner):
    """A stacked unidirectional RNN over feature frames (speech, sensors): returns the top layer's output
    per frame. Frames run in blocks of `block_steps`, one cell call per block, so SRU/QRNN read their
    weights once per block; in a session, frames short of a full block wait for the next chunk or the
    session's end. Rows of one batch share a block length (partial blocks are batched apart)."""

    cell_types = ("block",)

    def __init__(self, model: RNN, capacity: int, block_steps: int = 1):
        if model.bidirectional:
            raise ValueError("streaming needs a unidirectional RNN")
        if block_steps < 1:
            raise ValueError("block_steps must be >= 1")
        self.model, self.block_steps = model, int(block_steps)
        self.layers = StackedState(model)
        super().__init__(StatePool(capacity, self.layers.widths))

    def prepare(self, inputs):
        frames = np.asarray(inputs.get("frames"), dtype=np.float32)
        if frames.ndim != 2 or frames.shape[1] != self.model.input_size:
            raise ValueError(f"frames must have shape [T, {self.model.input_size}], got {list(frames.shape)}")
        if not np.isfinite(frames).all():
            raise ValueError("frames contain NaN or infinity")
        return frames, 1

    def start(self, req):
        session = req.session
        frames = req.payload if session is None or session.buffer is None else np.concatenate(
            [session.buffer, req.payload])
        k = self.block_steps
        usable = len(frames) if session is None or req.end else len(frames) // k * k
        if session is not None:
            session.buffer = frames[usable:]
        req.progress["frames"] = frames[:usable]
        req.progress["out"] = np.empty((usable, self.model.hidden_size), np.float32)
        req.ready["block"] = [0] if usable else []
        if not usable:
            self._finish(req, self._result(req))

    def run(self, cell_type, nodes, pad_rows=0):
        k = self.block_steps
        groups: dict[int, list] = {}
        for req, start in nodes:
            groups.setdefault(min(k, len(req.progress["frames"]) - start), []).append((req, start))
        for length, group in groups.items():
            slots = np.concatenate([r.slots for r, _ in group])
            xs = np.stack([r.progress["frames"][s:s + length] for r, s in group], axis=1)
            ys = self.layers.steps(self.model, self.pool, slots, xs, pad_rows)
            pad_rows = 0  # the padding (graph baseline) is paid once per step
            for row, (req, start) in enumerate(group):
                req.progress["out"][start:start + length] = ys[:, row]
                if start + length < len(req.progress["frames"]):
                    req.ready["block"] = [start + length]
                else:
                    self._finish(req, self._result(req))

    def _result(self, req):
        session = req.session
        return {"outputs": req.progress["out"], "frames_pending": 0 if session is None else len(session.buffer)}


class OCRRunner(Runner):
    """A 1-layer bidirectional recognizer over a line image: its forward and backward directions are two
    cell types, each stepped over many lines at once; when both have covered a line, the CTC head and
    greedy decoding give its text."""

    cell_types = ("forward", "backward")

    def __init__(self, model: OCRModel, capacity: int):
        if model.rnn.num_layers != 1 or not model.rnn.bidirectional:
            raise ValueError("OCR serving needs a 1-layer bidirectional recognizer")
        self.model = model
        self.cells = dict(zip(self.cell_types, model.rnn.layers[0]))
        widths = {f"{d}{i}": w for d, cell in self.cells.items() for i, w in enumerate(cell.state_widths())}
        super().__init__(StatePool(capacity, widths))

    def prepare(self, inputs):
        return self.model.frames(inputs.get("image")), 1

    def start(self, req):
        steps, hidden = len(req.payload), self.model.rnn.hidden_size
        req.progress["h"] = {d: np.empty((steps, hidden), np.float32) for d in self.cell_types}
        req.ready["forward"] = [0]
        req.ready["backward"] = [0]

    def run(self, cell_type, nodes, pad_rows=0):
        cell = self.cells[cell_type]
        slots = np.concatenate([r.slots for r, _ in nodes])
        frame = (lambda req, t: t) if cell_type == "forward" else (lambda req, t: len(req.payload) - 1 - t)
        padding = [np.zeros_like(nodes[0][0].payload[0])] * pad_rows
        x = np.stack([req.payload[frame(req, t)] for req, t in nodes] + padding)
        names = [f"{cell_type}{i}" for i in range(len(cell.state_widths()))]
        state = tuple(np.concatenate([self.pool[n][slots], np.zeros((pad_rows, self.pool[n].shape[1]), np.float32)])
                      for n in names)
        new = cell.step(x, state)
        for name, arr in zip(names, new):
            self.pool[name][slots] = arr[: len(nodes)]
        for row, (req, t) in enumerate(nodes):
            req.progress["h"][cell_type][frame(req, t)] = new[0][row]
            req.ready[cell_type] = [t + 1] if t + 1 < len(req.payload) else []
            if not req.ready["forward"] and not req.ready["backward"]:
                hidden = np.concatenate([req.progress["h"][d] for d in self.cell_types], axis=1)
                self._finish(req, {"text": self.model.text(self.model.head(hidden))})


def make_runner(model, capacity: int, block_steps: int = 1) -> Runner:
    """The runner for a loaded model (by its architecture)."""
    if isinstance(model, RNN):
        return StreamRunner(model, capacity, block_steps)
    kinds = {LanguageModel: LanguageModelRunner, Seq2Seq: Seq2SeqRunner, TreeLSTM: TreeRunner, OCRModel: OCRRunner}
    for cls, runner in kinds.items():
        if isinstance(model, cls):
            return runner(model, capacity)
    raise ValueError(f"no serving runner for architecture {getattr(model, 'arch', type(model).__name__)!r}")
