"""How each model's requests become batched cell steps.

A runner owns a model and its batch memory. The engine asks it to `admit` a request (put it into its
first stage), how many rows each stage has `ready`, and to `step` a stage: run its next window of rows
and hand back the requests that left (finished with `result` set, or dropped because they were
cancelled). Sequence models keep their rows in persistent per-stage batches (engine/batch.py); a tree's
nodes live in pool slots and wait in ready queues. Per-row bookkeeping (token lookup, scores, lengths,
end-of-sequence, finish detection) is numpy over the window, so a step costs the same number of Python
calls whatever its batch size; only a finishing request costs Python of its own (building its result).
`pad_to` widens a step with dummy rows, which is how the graph baseline pays for padding.
Runners know nothing of threads or HTTP.
"""

from __future__ import annotations

import collections
import time

import numpy as np

from cellserve.engine.batch import Stage, layer_state_names, layer_state_widths, stack_steps
from cellserve.engine.pool import Arena, StatePool
from cellserve.engine.request import Request
from cellserve.models import LanguageModel, Seq2Seq, TreeLSTM, tree_levels
from cellserve.models.lm import log_softmax

ADMITTED, NO_ROOM, DONE = "admitted", "no room", "done"  # what admit() says


def _token_array(value, name: str, vocab: int, min_len: int = 1) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 1 or len(arr) < min_len:
        raise ValueError(f"{name} must be a 1-D list of at least {min_len} token ids, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got {arr.dtype}")
    if arr.min() < 0 or arr.max() >= vocab:
        raise ValueError(f"{name} token ids must be in [0, {vocab}), got {arr.min()}..{arr.max()}")
    return arr.astype(np.int64)


class Runner:
    cell_types: tuple[str, ...] = ()  # stages, earliest first: later stages finish requests sooner
    pads = True  # sequence models pad finished requests in the graph baseline; trees do not
    default_pick = "stage"  # the engine's cellular pick when none is given

    def __init__(self, capacity: int):
        self.capacity = int(capacity)  # rows (requests) it can hold at once; tree nodes for trees
        self.cancel_flags = np.zeros(0, bool)  # the engine's, indexed by Request.ticket
        self.kernel_seconds = 0.0  # time inside the model's compute (kernels), for the overhead metric
        self.last_rows = 0  # rows (without padding) of the last step
        self.last_padding = 0.0  # padding the last step computed, in rows (for the engine's padding share)

    # --- engine-facing -------------------------------------------------------------------------------
    def prepare(self, inputs: dict) -> tuple[object, int]:
        """Validate inputs; return (payload, state slots needed). Raises ValueError."""
        raise NotImplementedError

    def length(self, payload) -> int:
        """The request's size for length bucketing (tokens, source tokens or tree nodes)."""
        return len(payload)

    def admit(self, reqs: list[Request]) -> list:
        """Put requests into their first stage; for each: ADMITTED, NO_ROOM (try again later), DONE (its
        result is already known, e.g. a chunk whose frames all wait for a full block) or the exception
        that failed it alone."""
        out = []
        for req in reqs:  # one at a time, stopping at the first that finds no room (keeps arrival order)
            if out and out[-1] == NO_ROOM:
                out.append(NO_ROOM)
                continue
            try:
                out.append(self._admit(req))
            except Exception as exc:
                out.append(exc)
        return out

    def _admit(self, req: Request) -> str:
        raise NotImplementedError

    def ready(self, cell_type: str) -> int:
        raise NotImplementedError

    def oldest(self, cell_type: str) -> float:
        """Arrival time of the oldest request with rows ready in this stage."""
        raise NotImplementedError

    def step(self, cell_type: str, max_rows: int, pad_to: int = 0) -> list[Request]:
        raise NotImplementedError

    def drop(self, req: Request) -> None:
        """Forget a request that will not finish (cancelled, failed, engine stopped): free its memory."""
        raise NotImplementedError

    def check_snapshot(self, snapshot: dict) -> None:
        """Raise ValueError unless `snapshot` is a session state this runner can restore."""
        raise ValueError("this model keeps no state between requests: there is no sequence to restore")

    @property
    def used(self) -> int:
        raise NotImplementedError


class SequenceRunner(Runner):
    """Runners whose requests hold one row per stage they are in (token and frame sequences)."""

    def __init__(self, capacity: int, stages: list[Stage]):
        super().__init__(capacity)
        self.stages = {s.name: s for s in stages}

    def ready(self, cell_type):
        return self.stages[cell_type].n

    def oldest(self, cell_type):
        stage = self.stages[cell_type]
        return float(stage["arrival"][: stage.n].min())

    @property
    def used(self) -> int:
        return len({id(r) for s in self.stages.values() for r in s.reqs})

    def _window(self, stage: Stage, max_rows: int) -> tuple[int, int, list[Request]]:
        """The next window of rows, after dropping the cancelled requests found in it (their flags are
        read for these rows only). Returns (a, b, dropped)."""
        dropped = []
        while True:
            a, b = stage.window(max_rows)
            flagged = np.flatnonzero(self.cancel_flags[stage["ticket"][a:b]])
            if not len(flagged):
                return a, b, dropped
            for req in [stage.reqs[a + i] for i in flagged]:
                self.drop(req)
                dropped.append(req)
            stage.cursor = a

    def drop(self, req):
        for name in list(req.rows):
            self.stages[name].remove([req.rows[name]])
        self._free(req)

    def _free(self, req: Request) -> None:
        """Give back a request's arena blocks."""

    def _leave(self, stage: Stage, rows, finished: list[Request]) -> None:
        """Rows whose requests finished: free their memory and take them out of the stage."""
        for req in stage.remove(rows):
            self._free(req)
            finished.append(req)

    @staticmethod
    def _pad(values: np.ndarray, pad: int) -> np.ndarray:
        return values if not pad else np.concatenate([values, np.zeros((pad,) + values.shape[1:], values.dtype)])

    def _padding(self, stage: Stage, a: int, b: int, pad_to: int) -> int:
        pad = max(0, pad_to - (b - a))
        if b + pad > stage.capacity:
            raise RuntimeError(f"stage {stage.name!r} cannot pad {b - a} rows to {pad_to}")
        return pad


class LanguageModelRunner(SequenceRunner):
    """Scores a token sequence: log-likelihood of tokens[1:] and the predicted next token."""

    cell_types = ("lm",)

    def __init__(self, model: LanguageModel, capacity: int):
        self.model = model
        self.names = layer_state_names(model.rnn)
        self.tokens = Arena(0, np.int64)
        self.stage = Stage("lm", capacity, layer_state_widths(model.rnn),
                           {"offset": np.int64, "length": np.int64, "pos": np.int64, "score": np.float64,
                            "arrival": np.float64})
        super().__init__(capacity, [self.stage])

    def prepare(self, inputs):
        return _token_array(inputs.get("tokens"), "tokens", self.model.embedding.vocab_size), 1

    def admit(self, reqs):
        for req in reqs:
            req.progress["offset"] = self.tokens.put(req.payload)
        self.stage.add(reqs, offset=[r.progress["offset"] for r in reqs], length=[len(r.payload) for r in reqs],
                       pos=0, score=0.0, arrival=[r.arrival for r in reqs])
        return [ADMITTED] * len(reqs)

    def _free(self, req):
        self.tokens.free(req.progress["offset"], len(req.payload))

    def step(self, cell_type, max_rows, pad_to=0):
        st, model = self.stage, self.model
        a, b, out = self._window(st, max_rows)
        n = b - a
        if not n:
            return out
        pad = self._padding(st, a, b, pad_to)
        offset, pos, length = st["offset"][a:b], st["pos"][a:b], st["length"][a:b]
        start = time.perf_counter()
        x = model.embedding.table[self._pad(self.tokens.data[offset + pos], pad)]
        top = stack_steps(model.rnn, st, self.names, x[None], a, b + pad)[0]
        logp = log_softmax(model.head(top))  # padded rows pay for the head too, as in a padded graph
        self.kernel_seconds += time.perf_counter() - start
        nxt = pos + 1
        more = nxt < length
        go = np.flatnonzero(more)
        st["score"][a + go] += logp[go, self.tokens.data[offset[go] + nxt[go]]]
        st["pos"][a:b] = nxt
        done = np.flatnonzero(~more)
        for i in done:
            st.reqs[a + i].result = {"log_likelihood": float(st["score"][a + i]), "next_token": int(logp[i].argmax())}
        self._leave(st, a + done, out)
        self.last_rows = n
        return out


class Seq2SeqRunner(SequenceRunner):
    """Encoder steps over the source, then greedy decoder steps, as two stages batched apart; a request
    moves its states from the encoder's batch to the decoder's once, when its source is read."""

    cell_types = ("encoder", "decoder")

    def __init__(self, model: Seq2Seq, capacity: int):
        self.model = model
        self.names = layer_state_names(model.encoder)
        widths = layer_state_widths(model.encoder)
        self.src, self.out = Arena(0, np.int64), Arena(0, np.int64)
        self.encoder = Stage("encoder", capacity, widths, {"offset": np.int64, "length": np.int64,
                                                           "pos": np.int64, "arrival": np.float64})
        self.decoder = Stage("decoder", capacity, widths, {"prev": np.int64, "out": np.int64, "count": np.int64,
                                                           "max_len": np.int64, "stop": bool, "arrival": np.float64})
        super().__init__(capacity, [self.encoder, self.decoder])

    def prepare(self, inputs):
        src = _token_array(inputs.get("tokens"), "tokens", self.model.src_embedding.vocab_size)
        max_len = int(inputs.get("max_output_tokens", 2 * len(src) + 10))
        if not 1 <= max_len <= 4096:
            raise ValueError(f"max_output_tokens must be in [1, 4096], got {max_len}")
        return {"src": src, "max_len": max_len, "stop_at_eos": bool(inputs.get("stop_at_eos", True))}, 1

    def length(self, payload):
        return len(payload["src"])

    def admit(self, reqs):
        for req in reqs:
            req.progress["src"] = self.src.put(req.payload["src"])
        self.encoder.add(reqs, offset=[r.progress["src"] for r in reqs], length=[len(r.payload["src"]) for r in reqs],
                         pos=0, arrival=[r.arrival for r in reqs])
        return [ADMITTED] * len(reqs)

    def _free(self, req):
        if "src" in req.progress:
            self.src.free(req.progress.pop("src"), len(req.payload["src"]))
        if "out" in req.progress:
            self.out.free(req.progress.pop("out"), req.payload["max_len"])

    def step(self, cell_type, max_rows, pad_to=0):
        st = self.stages[cell_type]
        a, b, out = self._window(st, max_rows)
        if b > a:
            (self._encode if cell_type == "encoder" else self._decode)(st, a, b, self._padding(st, a, b, pad_to), out)
            self.last_rows = b - a
        return out

    def _encode(self, st, a, b, pad, out):
        model = self.model
        offset, pos = st["offset"][a:b], st["pos"][a:b]
        start = time.perf_counter()
        x = model.src_embedding.table[self._pad(self.src.data[offset + pos], pad)]
        stack_steps(model.encoder, st, self.names, x[None], a, b + pad)
        self.kernel_seconds += time.perf_counter() - start
        pos += 1
        done = a + np.flatnonzero(pos >= st["length"][a:b])
        if not len(done):
            return
        moving = [st.reqs[row] for row in done]  # read their sources: states move to the decoder
        for req in moving:
            self.src.free(req.progress.pop("src"), len(req.payload["src"]))
            req.progress["out"] = self.out.alloc(req.payload["max_len"])
        rows = self.decoder.add(moving, prev=model.bos_id, out=[r.progress["out"] for r in moving], count=0,
                                max_len=[r.payload["max_len"] for r in moving],
                                stop=[r.payload["stop_at_eos"] for r in moving], arrival=st["arrival"][done])
        self.decoder.state[rows] = st.state[done]  # encoder and decoder have the same state layout
        st.remove(done)

    def _decode(self, st, a, b, pad, out):
        model = self.model
        start = time.perf_counter()
        x = model.tgt_embedding.table[self._pad(st["prev"][a:b], pad)]
        top = stack_steps(model.decoder, st, self.names, x[None], a, b + pad)[0]
        tokens = model.head(top).argmax(axis=-1)[: b - a]
        self.kernel_seconds += time.perf_counter() - start
        count = st["count"][a:b]
        self.out.data[st["out"][a:b] + count] = tokens
        count += 1
        st["prev"][a:b] = tokens
        done = np.flatnonzero(((st["stop"][a:b] != 0) & (tokens == model.eos_id)) | (count >= st["max_len"][a:b]))
        for i in done:
            o = st["out"][a + i]
            st.reqs[a + i].result = {"tokens": self.out.data[o:o + count[i]].tolist()}
        self._leave(st, a + done, out)


class Frames:
    """A request of a frame-sequence model: its inputs (for the model's result_of) and the frames its
    front turned them into."""

    __slots__ = ("inputs", "frames")

    def __init__(self, inputs: dict, frames: np.ndarray):
        self.inputs, self.frames = inputs, frames

    def __len__(self) -> int:
        return len(self.frames)


class FrameSequenceRunner(SequenceRunner):
    """Runners of models whose recurrent core reads a sequence of feature frames. The model gives
    `rnn` (the core), `frames_of(inputs)` (validates a request and makes its frames: an embedding lookup,
    image columns, an imported graph's front) and `result_of(inputs, ys, finals)` (the request's result
    from the top layer's outputs (T, D*H) and every cell's final state, finals[l * D + d] = (h[, c]))."""

    def __init__(self, model, capacity: int, stages: list[Stage], block_steps: int):
        if block_steps < 1:
            raise ValueError("block_steps must be >= 1")
        self.model, self.rnn, self.block_steps = model, model.rnn, int(block_steps)
        super().__init__(capacity, stages)

    def prepare(self, inputs):
        return Frames(inputs, np.asarray(self.model.frames_of(inputs), dtype=np.float32)), 1

    def _blocks(self, st: Stage, a: int, b: int, pad_to: int, run) -> None:
        """Advance rows [a, b) by up to block_steps frames: run(rows, t, pad) for the rows with t frames
        left in this block; rows ending in a short block run apart, grouped (rare: the end of a sequence)."""
        k = self.block_steps
        steps = np.minimum(st["length"][a:b] - st["pos"][a:b], k)
        if (steps == k).all():
            run(slice(a, b), k, self._padding(st, a, b, pad_to))
            return
        for t in np.unique(steps):
            run(a + np.flatnonzero(steps == t), int(t), 0)

    @staticmethod
    def _cell_steps(cell, xs: np.ndarray, state: tuple) -> np.ndarray:
        """t steps of one cell over xs (t, rows, in), its state views updated in place; returns (t, rows, H)."""
        if len(xs) == 1:
            cell.step_into(xs[0], state)
            return state[0][None]
        ys, new = cell.steps(np.ascontiguousarray(xs), state)
        for view, value in zip(state, new):
            view[...] = value
        return ys


class StreamRunner(FrameSequenceRunner):
    """A unidirectional stack: all its layers advance together, in blocks of `block_steps` frames, one
    cell call per layer per block (SRU/QRNN read their weights once per block). In a session, frames short
    of a full block wait for the next chunk or the session's end, and the state waits in a pool slot
    between chunks."""

    cell_types = ("block",)

    def __init__(self, model, capacity: int, block_steps: int = 1):
        if model.rnn.bidirectional:
            raise ValueError("streaming needs a unidirectional RNN")
        rnn = model.rnn
        self.names = layer_state_names(rnn)
        widths = layer_state_widths(rnn)
        self.pool = StatePool(capacity, widths)  # sessions' states between chunks
        self.frames = Arena(rnn.input_size, np.float32)
        self.outputs = Arena(rnn.output_size, np.float32)
        self.stage = Stage("block", capacity, widths, {"offset": np.int64, "length": np.int64, "pos": np.int64,
                                                       "out": np.int64, "arrival": np.float64})
        super().__init__(model, capacity, [self.stage], block_steps)

    @property
    def used(self):
        """Sessions' slots (held between chunks) and the rows of requests without a session."""
        return self.pool.used + sum(1 for r in self.stage.reqs if r.session is None)

    def check_snapshot(self, snapshot):
        state, pending = snapshot.get("state"), snapshot.get("pending")
        if not isinstance(state, dict) or set(state) != set(self.pool.arrays):
            raise ValueError(f"the snapshot's state arrays {sorted(state or {})} are not this model's "
                             f"{sorted(self.pool.arrays)}")
        for name, values in state.items():
            width = self.pool[name].shape[1]
            if np.shape(values) != (width,) or not np.isfinite(values).all():
                raise ValueError(f"snapshot state {name!r} must be {width} finite values, got shape {np.shape(values)}")
        if pending is None or np.ndim(pending) != 2 or np.shape(pending)[1] != self.rnn.input_size:
            raise ValueError(f"the snapshot's pending frames must have shape [n, {self.rnn.input_size}]")

    def _snapshot(self, req: Request, state) -> dict:
        """The session's state (after this chunk) and the frames waiting for a full block."""
        return {"state": {name: np.array(values, np.float32) for name, values in state.items()},
                "pending": np.array(req.session.buffer, np.float32)}

    def _admit(self, req):
        session = req.session
        if session is not None and session.slots is None:
            session.slots = self.pool.alloc(1)
            if session.slots is None:
                return NO_ROOM
            if session.restore is not None:  # a snapshot opens this session
                for name, values in session.restore["state"].items():
                    self.pool[name][session.slots[0]] = values
                session.buffer = np.asarray(session.restore["pending"], np.float32).reshape(-1, self.rnn.input_size)
                session.restore = None
        frames = req.payload.frames
        if session is not None and session.buffer is not None and len(session.buffer):
            frames = np.concatenate([session.buffer, frames])
        k = self.block_steps
        usable = len(frames) if session is None or req.end else len(frames) // k * k
        if session is not None:
            session.buffer = frames[usable:]
        if not usable:
            state = self._held(session)
            req.result = self._result(req, np.empty((0, self.rnn.output_size), np.float32), state)
            return DONE
        req.progress["frames"] = (self.frames.put(frames[:usable]), usable)
        req.progress["out"] = self.outputs.alloc(usable)
        rows = self.stage.add([req], offset=req.progress["frames"][0], length=usable, pos=0, out=req.progress["out"],
                              arrival=req.arrival)
        if session is not None:
            for name, arr in self.stage.states.items():
                arr[rows] = self.pool[name][session.slots[0]]
        return ADMITTED

    def _held(self, session) -> dict:
        """A session's state as it waits between chunks (zeros without a session)."""
        if session is None:
            return {name: np.zeros(arr.shape[1], np.float32) for name, arr in self.pool.arrays.items()}
        return {name: arr[session.slots[0]] for name, arr in self.pool.arrays.items()}

    def _free(self, req):
        offset, usable = req.progress.pop("frames")
        self.frames.free(offset, usable)
        self.outputs.free(req.progress.pop("out"), usable)

    def step(self, cell_type, max_rows, pad_to=0):
        st = self.stage
        a, b, out = self._window(st, max_rows)
        if b == a:
            return out
        self._blocks(st, a, b, pad_to, self._run)
        length = st["length"][a:b]
        done = np.flatnonzero(st["pos"][a:b] >= length)
        for i in done:
            req = st.reqs[a + i]
            o, n = st["out"][a + i], length[i]
            state = {name: arr[a + i] for name, arr in st.states.items()}
            if req.session is not None and not req.end:  # the state waits for the next chunk
                for name, value in state.items():
                    self.pool[name][req.session.slots[0]] = value
            req.result = self._result(req, self.outputs.data[o:o + n].copy(), state)
        self._leave(st, a + done, out)
        self.last_rows = b - a
        return out

    def _run(self, rows, t: int, pad: int) -> None:
        """t steps of every layer for the stage rows `rows` (a slice runs in place, padded by `pad` rows)."""
        st = self.stage
        index = (st["offset"][rows] + st["pos"][rows])[:, None] + np.arange(t)
        xs = self.frames.data[index].transpose(1, 0, 2)
        start = time.perf_counter()
        if isinstance(rows, slice):
            if pad:
                xs = np.concatenate([xs, np.zeros((t, pad, xs.shape[2]), np.float32)], axis=1)
            ys = stack_steps(self.rnn, st, self.names, xs, rows.start, rows.stop + pad)[:, : rows.stop - rows.start]
        else:  # gathered rows: their state is copied out and back
            ys = xs
            for cell, layer in zip(self.rnn.cells, self.names):
                state = tuple(st.states[name][rows] for name in layer)
                ys = self._cell_steps(cell, ys, state)
                for name, value in zip(layer, state):
                    st.states[name][rows] = value
        self.kernel_seconds += time.perf_counter() - start
        out = (st["out"][rows] + st["pos"][rows])[:, None] + np.arange(t)
        self.outputs.data[out] = ys.transpose(1, 0, 2)
        st["pos"][rows] += t

    def _result(self, req, ys: np.ndarray, state: dict) -> dict:
        finals = [tuple(np.array(state[name]) for name in layer) for layer in self.names]
        result = self.model.result_of(req.payload.inputs, ys, finals)
        session = req.session
        result["frames_pending"] = 0 if session is None else len(session.buffer)
        if req.snapshot:
            result["snapshot"] = self._snapshot(req, state)
        return result


class BidirectionalRunner(FrameSequenceRunner):
    """A bidirectional stack over whole sequences: each layer's forward and backward directions are two
    stages, each stepped over many requests at once, in blocks of `block_steps` frames. A request enters
    layer l + 1 once both directions have covered layer l (the layer's output at a step needs both).
    Layer l reads arena `seq[l]` and writes its outputs, forward half then backward half, into
    `seq[l + 1]`; the top layer's outputs and every cell's final state go to the model's result_of."""

    def __init__(self, model, capacity: int, block_steps: int = 1):
        rnn = model.rnn
        if not rnn.bidirectional:
            raise ValueError("BidirectionalRunner runs bidirectional RNNs")
        self.cell_types = tuple(f"l{l}.{d}" for l in range(rnn.num_layers) for d in ("forward", "backward"))
        self.cells = {name: rnn.cells[i] for i, name in enumerate(self.cell_types)}
        self.seq = [Arena(rnn.input_size, np.float32)] + [Arena(rnn.output_size, np.float32)
                                                          for _ in range(rnn.num_layers)]
        stages = [Stage(name, capacity, {f"s{i}": w for i, w in enumerate(cell.state_widths())},
                        {"src": np.int64, "dst": np.int64, "length": np.int64, "pos": np.int64, "arrival": np.float64})
                  for name, cell in self.cells.items()]
        super().__init__(model, capacity, stages, block_steps)

    def _admit(self, req):
        if req.session is not None:
            raise ValueError("a bidirectional model reads whole sequences: it cannot stream in sessions")
        req.progress.update(blocks=[(0, self.seq[0].put(req.payload.frames))], finals=[None] * len(self.cells))
        self._enter(req, 0)
        return ADMITTED

    def _enter(self, req, layer: int) -> None:
        """Start both directions of `layer`, reading the request's block in seq[layer]."""
        steps = len(req.payload)
        src = req.progress["blocks"][-1][1]
        dst = self.seq[layer + 1].alloc(steps)
        req.progress["blocks"].append((layer + 1, dst))
        req.progress["left"] = 2
        for d in ("forward", "backward"):
            self.stages[f"l{layer}.{d}"].add([req], src=src, dst=dst, length=steps, pos=0, arrival=req.arrival)

    def _free(self, req):
        steps = len(req.payload)
        for level, offset in req.progress.pop("blocks", []):
            self.seq[level].free(offset, steps)

    def step(self, cell_type, max_rows, pad_to=0):
        st, cell = self.stages[cell_type], self.cells[cell_type]
        a, b, out = self._window(st, max_rows)
        if b == a:
            return out
        layer, direction = int(cell_type[1:cell_type.index(".")]), cell_type.endswith("backward")
        hidden = self.rnn.hidden_size
        source, target = self.seq[layer], self.seq[layer + 1]

        def run(rows, t, pad):
            pos, length = st["pos"][rows], st["length"][rows]
            frame = pos[:, None] + np.arange(t)
            if direction:
                frame = length[:, None] - 1 - frame
            xs = source.data[st["src"][rows][:, None] + frame].transpose(1, 0, 2)
            if pad:
                xs = np.concatenate([xs, np.zeros((t, pad, xs.shape[2]), np.float32)], axis=1)
            wide = slice(rows.start, rows.stop + pad) if isinstance(rows, slice) else rows
            state = tuple(st.states[f"s{i}"][wide] for i in range(len(st.states)))
            start = time.perf_counter()
            ys = self._cell_steps(cell, xs, state)
            self.kernel_seconds += time.perf_counter() - start
            if not isinstance(rows, slice):
                for i, value in enumerate(state):
                    st.states[f"s{i}"][rows] = value
            target.data[st["dst"][rows][:, None] + frame, direction * hidden:(direction + 1) * hidden] = \
                ys[:, : len(pos)].transpose(1, 0, 2)
            st["pos"][rows] += t

        self._blocks(st, a, b, pad_to, run)
        done = a + np.flatnonzero(st["pos"][a:b] >= st["length"][a:b])
        index = self.cell_types.index(cell_type)
        for row in done:
            st.reqs[row].progress["finals"][index] = tuple(st.states[f"s{i}"][row].copy() for i in range(len(st.states)))
        for req in st.remove(done):
            req.progress["left"] -= 1
            if req.progress["left"]:
                continue
            if layer + 1 < self.rnn.num_layers:
                self._enter(req, layer + 1)
                continue
            top = req.progress["blocks"][-1][1]
            ys = self.seq[-1].data[top:top + len(req.payload)].copy()
            req.result = self.model.result_of(req.payload.inputs, ys, req.progress["finals"])
            self._free(req)
            out.append(req)
        self.last_rows = b - a
        return out


class TreeRunner(Runner):
    """Leaves and internal nodes are two cell types; a node is ready once its children are done. A tree's
    nodes take contiguous pool slots [base, base + n), with its parents, child lists (CSR), pending-child
    counts and tokens in per-slot arrays, so a step gathers children, stores states and finds the parents
    that became ready with array operations. Ready queues hold (slots, owner ids) chunks; a chunk entry
    whose slot changed owner (its tree was cancelled) is skipped."""

    cell_types = ("leaf", "internal")
    pads = False
    default_pick = "oldest"  # a tree's critical path is its depth: the oldest tree's nodes first (measured:
    # p90 54 vs 109 ms for "stage" at 449 req/s on the serving bench's TreeLSTM, 64 trees in flight)

    def __init__(self, model: TreeLSTM, capacity: int):
        super().__init__(capacity)
        self.model = model
        hidden = model.hidden_size
        ints = {k: np.int64 for k in ("parent", "kid_start", "kid_count", "kids", "waiting", "token", "owner",
                                      "ticket")}
        self.pool = StatePool(capacity, {"h": hidden, "c": hidden, **{k: 0 for k in ints}}, ints)
        self.pool["owner"][:] = -1
        self.queues = {t: collections.deque() for t in self.cell_types}  # (slots, owners, arrival) chunks
        self.counts = dict.fromkeys(self.cell_types, 0)
        self.live: dict[int, Request] = {}

    def prepare(self, inputs):
        parents = np.asarray(inputs.get("parents"))
        if parents.ndim != 1 or not np.issubdtype(parents.dtype, np.integer):
            raise ValueError("parents must be a 1-D list of integer node indices (-1 for the root)")
        tree_levels(parents)  # one tree, no cycles
        tokens = _token_array(inputs.get("tokens"), "tokens", self.model.embedding.vocab_size)
        if len(tokens) != len(parents):
            raise ValueError(f"tokens ({len(tokens)}) and parents ({len(parents)}) must have one entry per node")
        return {"tokens": tokens, "parents": parents.astype(np.int64)}, len(parents)

    def length(self, payload):
        return len(payload["parents"])

    @property
    def used(self):
        return self.pool.used

    def _admit(self, req):
        slots = self.pool.alloc(req.slots_needed)
        if slots is None:
            return NO_ROOM
        req.slots = slots
        parents = req.payload["parents"]
        n, base = len(parents), int(slots[0])
        p, span = self.pool, slice(base, base + n)
        inner = parents >= 0
        counts = np.bincount(parents[inner], minlength=n)
        p["parent"][span] = np.where(inner, parents + base, -1)
        p["kid_count"][span] = p["waiting"][span] = counts
        p["kid_start"][span] = base + np.cumsum(counts) - counts
        p["kids"][base:base + n - 1] = base + np.flatnonzero(inner)[np.argsort(parents[inner], kind="stable")]
        p["token"][span] = req.payload["tokens"]
        p["owner"][span] = req.id
        p["ticket"][span] = req.ticket
        self.live[req.id] = req
        self._push("leaf", base + np.flatnonzero(counts == 0), req.arrival)
        return ADMITTED

    def _push(self, cell_type, slots, arrival):
        if len(slots):
            self.queues[cell_type].append((slots, self.pool["owner"][slots], arrival))
            self.counts[cell_type] += len(slots)

    def ready(self, cell_type):
        return self.counts[cell_type]

    def oldest(self, cell_type):
        queue = self.queues[cell_type]
        return queue[0][2] if queue else float("inf")

    def _take(self, cell_type, max_rows) -> np.ndarray:
        """Up to max_rows ready slots from the front of the queue, without stale or cancelled entries."""
        queue, parts, owners, taken = self.queues[cell_type], [], [], 0
        while queue and taken < max_rows:
            slots, owner, arrival = queue.popleft()
            if taken + len(slots) > max_rows:
                cut = max_rows - taken
                queue.appendleft((slots[cut:], owner[cut:], arrival))
                slots, owner = slots[:cut], owner[:cut]
            parts.append(slots)
            owners.append(owner)
            taken += len(slots)
        self.counts[cell_type] -= taken
        if not parts:
            return np.zeros(0, np.int64)
        slots = np.concatenate(parts)
        return slots[self.pool["owner"][slots] == np.concatenate(owners)]

    def step(self, cell_type, max_rows, pad_to=0):
        p, model, out = self.pool, self.model, []
        slots = self._take(cell_type, max_rows)
        flagged = self.cancel_flags[p["ticket"][slots]]
        if flagged.any():
            for owner in np.unique(p["owner"][slots[flagged]]):
                req = self.live[int(owner)]
                self.drop(req)
                out.append(req)
            slots = slots[~flagged]
        self.last_rows = len(slots)
        if not len(slots):
            return out
        start = time.perf_counter()
        x = model.embedding.table[p["token"][slots]]
        if cell_type == "leaf":
            h, c = model.cell.nodes(x)
        else:
            counts = p["kid_count"][slots]
            ends = np.cumsum(counts)
            kids = p["kids"][np.repeat(p["kid_start"][slots] - (ends - counts), counts) + np.arange(ends[-1])]
            h, c = model.cell.nodes(x, p["h"][kids], p["c"][kids], np.repeat(np.arange(len(slots)), counts))
        p["h"][slots] = h
        p["c"][slots] = c
        self.kernel_seconds += time.perf_counter() - start
        parents = p["parent"][slots]
        inner = parents >= 0
        np.subtract.at(p["waiting"], parents[inner], 1)
        touched = np.unique(parents[inner])
        self._push("internal", touched[p["waiting"][touched] == 0], time.perf_counter())
        roots = slots[~inner]
        if len(roots):
            start = time.perf_counter()
            logits = model.head(h[~inner])
            self.kernel_seconds += time.perf_counter() - start
            for slot, row in zip(roots, logits):
                req = self.live.pop(int(p["owner"][slot]))
                req.result = {"logits": row.tolist()}
                self._release(req)
                out.append(req)
        return out

    def _release(self, req):
        p = self.pool
        p["owner"][req.slots] = -1
        p.release(req.slots)
        req.slots = None

    def drop(self, req):
        if self.live.pop(req.id, None) is not None:
            self._release(req)


class WholeGraphRunner(Runner):
    """ONNX Runtime running an imported model's original graph, one call per batch of requests, their rows
    padded with zeros along the time axis to the longest and cut back after: what Triton + ONNX Runtime
    do under dynamic batching (the graph policy). The serving backend `onnxruntime` of an imported model,
    and the peer its benchmark compares with."""

    cell_types = ("graph",)
    pads = False  # the batch is what was admitted; padding is along time

    def __init__(self, model, capacity: int):
        from cellserve.models.onnx_io import ort_session
        import onnx

        if not model.whole_graph:
            raise ValueError("this imported model was saved without its original graph")
        super().__init__(capacity)
        self.model = model
        self.session = ort_session(onnx.load_from_string(model.whole_graph))
        self.waiting: list[Request] = []
        self._time_lengths: dict[int, dict[str, int]] = {}  # input steps -> each output's steps

    def prepare(self, inputs):
        rows = self.model.rows(inputs)
        if len(rows) != 1:
            raise ValueError("an engine request is one row")
        return rows[0], 1

    def length(self, payload):
        return self._steps(payload)

    def _steps(self, row: dict) -> int:
        timed = next((s for s in self.model.inputs if s["time_axis"] is not None), None)
        return 1 if timed is None else row[timed["name"]].shape[timed["time_axis"]]

    def _admit(self, req):
        self.waiting.append(req)
        return ADMITTED

    def ready(self, cell_type):
        return len(self.waiting)

    def oldest(self, cell_type):
        return min(r.arrival for r in self.waiting)

    @property
    def used(self):
        return len(self.waiting)

    def drop(self, req):
        if req in self.waiting:
            self.waiting.remove(req)

    def step(self, cell_type, max_rows, pad_to=0):
        batch, self.waiting = self.waiting[:max_rows], self.waiting[max_rows:]
        dropped = [r for r in batch if self.cancel_flags[r.ticket]]
        batch = [r for r in batch if not self.cancel_flags[r.ticket]]
        self.last_padding = 0.0
        if batch:
            steps = [self._steps(r.payload) for r in batch]
            start = time.perf_counter()
            outputs = self.session.run(None, self._feeds([r.payload for r in batch], max(steps)))
            self.kernel_seconds += time.perf_counter() - start
            self.last_padding = len(batch) - sum(steps) / max(steps)  # time steps of padding, as rows
            for i, (req, n) in enumerate(zip(batch, steps)):
                lengths = self._output_steps(n, req.payload)
                req.result = {}
                for spec, value in zip(self.model.outputs, outputs):
                    row = np.take(value, [i], axis=spec["batch_axis"]) if spec["batch_axis"] is not None else value
                    if spec["time_axis"] is not None:
                        row = np.take(row, range(lengths[spec["name"]]), axis=spec["time_axis"])
                    req.result[spec["name"]] = row
        self.last_rows = len(batch)
        return dropped + batch

    def _feeds(self, rows: list[dict], steps: int) -> dict:
        feeds = {}
        for spec in self.model.inputs:
            parts = [r[spec["name"]] for r in rows]
            if spec["time_axis"] is not None:
                parts = [np.pad(p, [(0, steps - p.shape[a]) if a == spec["time_axis"] else (0, 0) for a in range(p.ndim)])
                         for p in parts]
            feeds[spec["name"]] = parts[0] if spec["batch_axis"] is None else np.concatenate(parts, spec["batch_axis"])
        return feeds

    def _output_steps(self, n: int, row: dict) -> dict[str, int]:
        """Each output's steps for an input of n steps (the graph run alone on zeros, once per length)."""
        if n not in self._time_lengths:
            outputs = self.session.run(None, self._feeds([{k: np.zeros_like(v) for k, v in row.items()}], n))
            self._time_lengths[n] = {s["name"]: o.shape[s["time_axis"]] for s, o in zip(self.model.outputs, outputs)
                                     if s["time_axis"] is not None}
        return self._time_lengths[n]


def make_runner(model, capacity: int, block_steps: int = 1) -> Runner:
    """The runner for a loaded model (by its architecture)."""
    kinds = {LanguageModel: LanguageModelRunner, Seq2Seq: Seq2SeqRunner, TreeLSTM: TreeRunner}
    for cls, runner in kinds.items():
        if isinstance(model, cls):
            return runner(model, capacity)
    if hasattr(model, "frames_of"):  # a frame-sequence model: an RNN, classifier, recognizer, imported graph
        runner = BidirectionalRunner if model.rnn.bidirectional else StreamRunner
        return runner(model, capacity, block_steps)
    raise ValueError(f"no serving runner for architecture {getattr(model, 'arch', type(model).__name__)!r}")
