"""Runners of frame-sequence models: a recurrent core that reads a sequence of feature frames.

The families of the stream RNN, the classifier, the OCR recognizer and imported graphs all run on these.
Each gives a `source` with `rnn` (the core), `frames_of(inputs)` (validates a request and makes its frames:
an embedding lookup, image columns, an imported graph's front) and `result_of(inputs, ys, finals)` (the
request's result from the top layer's outputs (T, D*H) and every cell's final state,
finals[l * D + d] = (h[, c])).

A source whose front and head are worth batching (an imported graph's convolutions) gives them for many
rows at once instead: `frames_batch(rows)`, `results_batch(rows, ys, finals)`, and `initial_states(rows)`
(a row's own initial state, when the client sends it). The stream runner then runs the front once over
the requests an engine step admits and the head once over the requests a step finishes (BatchMaker: every
subgraph with shared weights is a cell), and keeps each session's input `context` (the source's
{input: samples}: the last samples of the previous chunk, put before the next one).

A unidirectional core (LSTM, GRU, SRU, QRNN) also runs on the native step loop (NativeStreamRunner, the
default): its rows, frames and block steps live in engine/native/steploop.cpp, and Python keeps the front,
the head and the sessions (StreamChunks, which both stream runners share).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np

from cellserve.engine.batch import Stage, layer_state_names, layer_state_widths, stack_steps, stage_steps
from cellserve.engine.pool import Arena, StatePool
from cellserve.engine.request import Request
from cellserve.engine.runner import ADMITTED, DONE, NO_ROOM, SequenceRunner, pad_rows
from cellserve.engine.steploop import NativeLoopRunner, native_layers

CONTEXT = "context:"  # snapshot state entries that hold a session's input context


class Frames:
    """A request of a frame-sequence model: its inputs (for the source's result_of) and the frames its
    front turned them into. A session's message of several chunks is one request (`chunks`: each chunk's
    inputs, in order, with `inputs` None): its frames run as one row, and `marks` (frame counts) say where
    each chunk ends, so that each gets its own result."""

    __slots__ = ("inputs", "frames", "initial", "chunks", "marks")

    def __init__(self, inputs: dict | None, frames: np.ndarray | None, initial: list | None = None,
                 chunks: list | None = None):
        self.inputs, self.frames = inputs, frames
        self.initial = initial  # the row's own initial state per cell, when its inputs carry one
        self.chunks, self.marks = chunks, None

    def __len__(self) -> int:
        return len(self.frames)


class FrameSource:
    """What every frame runner shares: the source (front, core, head) and blocks of `block_steps` frames."""

    def _use_source(self, source, block_steps: int) -> None:
        if block_steps < 1:
            raise ValueError("block_steps must be >= 1")
        self.source, self.rnn, self.block_steps = source, source.rnn, int(block_steps)

    @contextmanager
    def _source_compute(self):
        """What the source computes in the block (an imported graph's front and head in ONNX Runtime) counts
        as the model's kernel time, so the engine's overhead metric is its own work alone."""
        since = getattr(self.source, "compute_seconds", 0.0)
        try:
            yield
        finally:
            self.kernel_seconds += getattr(self.source, "compute_seconds", 0.0) - since

    def prepare(self, inputs):
        """inputs: a request's row, or (a runner that merges_chunks) the list of a message's chunks."""
        chunks = inputs if isinstance(inputs, list) else None
        if self.front_at_admission:  # the front runs at admission, over every request admitted with this one
            return (Frames(None, None, chunks=chunks) if chunks else Frames(inputs, None)), 1
        if chunks is None:
            return Frames(inputs, np.asarray(self.source.frames_of(inputs), dtype=np.float32)), 1
        payload = Frames(None, None, chunks=chunks)
        _set_chunk_frames(payload, [np.asarray(self.source.frames_of(c), dtype=np.float32) for c in chunks])
        return payload, 1

    @property
    def front_at_admission(self) -> bool:
        """The source batches its front and wants it run in the engine, in session order (its state or
        context is per session): sources that do not want it get their front run per request when the
        request is submitted, on the submitter's thread, in parallel with the engine (measured: 400 vs 318
        req/s for the imported Conv+GRU workload on 2 cores, whose fronts are long)."""
        return (hasattr(self.source, "frames_batch") and getattr(self.source, "front_in_engine", True)
                and not self.rnn.bidirectional)

    @property
    def batched(self) -> bool:
        """The source runs its head over the rows a step finishes at once (results_batch)."""
        return hasattr(self.source, "results_batch") and not self.rnn.bidirectional

    def length(self, payload):
        return 1 if payload.frames is None else len(payload.frames)


class FrameSequenceRunner(FrameSource, SequenceRunner):
    """The Python loop's frame runners: stages of engine/batch.py, stepped in blocks."""

    def __init__(self, source, capacity: int, stages: list[Stage], block_steps: int):
        self._use_source(source, block_steps)
        SequenceRunner.__init__(self, capacity, stages)

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
    def _widened(rows, xs: np.ndarray, pad: int):
        """(rows, xs) with `pad` dummy rows after a slice of rows: a padded step of the graph policy."""
        if not pad:
            return rows, xs
        return slice(rows.start, rows.stop + pad), pad_rows(xs, pad, axis=1)


class StreamChunks(FrameSource):
    """What both stream runners do around the recurrent core: a unidirectional stack whose sessions hold their
    state in a pool slot between chunks; frames short of a full block wait for the next chunk or the
    session's end; the source's front runs over the requests admitted together and its head over those that
    finish together."""

    def _use_stream(self, source, capacity: int, block_steps: int) -> None:
        if source.rnn.bidirectional:
            raise ValueError("streaming needs a unidirectional RNN")
        self._use_source(source, block_steps)
        self.names = layer_state_names(self.rnn)
        self.widths = layer_state_widths(self.rnn)
        self.pool = StatePool(capacity, self.widths)  # sessions' states between chunks

    def close_session(self, session):
        if session.slots is not None:
            self.pool.release(session.slots)
            session.slots = None

    def check_snapshot(self, snapshot):
        state, pending = snapshot.get("state"), snapshot.get("pending")
        if isinstance(state, dict):  # (the session's input context travels beside its state arrays)
            state = {k: v for k, v in state.items() if not k.startswith(CONTEXT)}
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
        context = {CONTEXT + name: np.asarray(values, np.float32).reshape(-1)
                   for name, values in req.session.context.items()}
        return {"state": {**{name: np.array(values, np.float32) for name, values in state.items()}, **context},
                "pending": np.array(req.session.buffer, np.float32)}

    def _with_fronts(self, reqs) -> tuple[list, dict]:
        """The requests whose front ran (batched, for those admitted together when the source wants it at
        admission) and {request id: exception} for those whose front failed."""
        fresh = [r for r in reqs if r.payload.frames is None]  # (one sent back for room keeps its frames)
        with self._source_compute():
            failed = self._front(fresh) if self.front_at_admission and fresh else {}
        return [r for r in reqs if r.id not in failed], failed

    def _front(self, reqs) -> dict:
        """Context, front and client-given initial states for the requests admitted together (every chunk
        of each, in order), batched; returns {request id: exception} for those that failed."""
        context = getattr(self.source, "context", {})
        rows = []
        for req in reqs:
            session = req.session
            if session is not None and session.restore is not None:  # a snapshot's context comes first
                for key, values in session.restore["state"].items():
                    if key.startswith(CONTEXT):
                        session.context[key[len(CONTEXT):]] = np.asarray(values, np.float32)
            for inputs in _chunks_of(req.payload):
                for name, n in context.items():
                    x = inputs[name]
                    prev = session.context.get(name) if session is not None else None
                    prev = np.zeros(x.shape[:-1] + (n,), x.dtype) if prev is None else prev.reshape(x.shape[:-1] + (n,))
                    inputs[name] = np.concatenate([prev, x], axis=-1)
                    if session is not None:
                        session.context[name] = inputs[name][..., -n:].copy()
                rows.append(inputs)
        try:
            frames = self.source.frames_batch(rows)
            initial = self.source.initial_states(rows)
        except Exception:  # noqa: BLE001 (one bad row must not fail the others: each alone)
            return self._front_alone(reqs)
        at = 0
        for req in reqs:
            n = len(_chunks_of(req.payload))
            self._fronted(req.payload, frames[at:at + n], initial[at:at + n])
            at += n
        return {}

    def _front_alone(self, reqs) -> dict:
        failed = {}
        for req in reqs:
            try:
                chunks = _chunks_of(req.payload)
                self._fronted(req.payload, self.source.frames_batch(chunks), self.source.initial_states(chunks))
            except Exception as exc:  # noqa: BLE001
                failed[req.id] = exc
        return failed

    @staticmethod
    def _fronted(payload: Frames, frames: list, initial: list) -> None:
        """A request's frames (and a client-given initial state) from its chunks' fronts."""
        if payload.chunks is None:
            payload.frames, payload.initial = frames[0], initial[0]
        else:
            _set_chunk_frames(payload, frames)
            payload.initial = next((state for state in initial if state is not None), None)

    def _chunk(self, req):
        """The frames a request runs now (its session's held-back frames first, whole blocks only until the
        session ends), or NO_ROOM (no slot for a new session's state), or DONE (nothing to run: its result is
        set)."""
        session = req.session
        if session is not None and req.payload.initial is not None:
            raise ValueError("in a session the server holds the state: send only the chunk's input")
        if session is not None and session.slots is None:
            session.slots = self.pool.alloc(1)
            if session.slots is None:
                return NO_ROOM
            if session.restore is not None:  # a snapshot opens this session
                for name, values in session.restore["state"].items():
                    if not name.startswith(CONTEXT):  # (the context was put back before the front ran)
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
            nothing = np.empty((0, self.rnn.output_size), np.float32)
            req.result = self._results([req], [nothing], [self._held(session)])[0]
            return DONE
        return frames[:usable]

    def _start_state(self, req) -> dict | None:
        """The state a request's rows start from: its session's, the client's own (its state inputs), or
        None (zeros)."""
        if req.session is not None:
            return self._held(req.session)
        if req.payload.initial is not None:
            return {name: value for layer, cell_state in zip(self.names, req.payload.initial)
                    for name, value in zip(layer, cell_state)}
        return None

    def _held(self, session) -> dict:
        """A session's state as it waits between chunks (zeros without a session)."""
        if session is None:
            return {name: np.zeros(arr.shape[1], np.float32) for name, arr in self.pool.arrays.items()}
        return {name: arr[session.slots[0]] for name, arr in self.pool.arrays.items()}

    def _keep(self, req, state: dict) -> None:
        """A chunk's final state waits in its session's slot for the next chunk."""
        if req.session is not None and not req.end:
            for name, value in state.items():
                self.pool[name][req.session.slots[0]] = value

    def _results(self, reqs, ys: list[np.ndarray], states: list[dict]) -> list[dict]:
        """Finished requests' results (the head batched when the source batches), with what a session's
        chunk adds: its frames held back for a full block, its snapshot when asked, and none of the
        outputs that only carry the state the server holds (the source's session_hidden). (A request here
        is anything with payload.inputs, session and snapshot: a message's chunk is one, see _pieces.)"""
        finals = [[tuple(np.array(state[name]) for name in layer) for layer in self.names] for state in states]
        inputs = [req.payload.inputs for req in reqs]
        if self.batched:
            results = self.source.results_batch(inputs, ys, finals)
        else:
            results = [self.source.result_of(i, y, f) for i, y, f in zip(inputs, ys, finals)]
        hidden = getattr(self.source, "session_hidden", ())
        for req, result, state in zip(reqs, results, states):
            session = req.session
            result["frames_pending"] = 0 if session is None else len(session.buffer)
            if session is not None:
                for name in hidden:
                    result.pop(name, None)
            if req.snapshot:
                result["snapshot"] = self._snapshot(req, state)
        return results


class StreamRunner(StreamChunks, FrameSequenceRunner):
    """A unidirectional stack on the Python loop: all its layers advance together, in blocks of `block_steps`
    frames, one cell call per layer per block (SRU/QRNN read their weights once per block)."""

    cell_types = ("block",)

    def __init__(self, source, capacity: int, block_steps: int = 1):
        self._use_stream(source, capacity, block_steps)
        self.frames = Arena(self.rnn.input_size, np.float32)
        self.outputs = Arena(self.rnn.output_size, np.float32)
        self.stage = Stage("block", capacity, self.widths, {"offset": np.int64, "length": np.int64, "pos": np.int64,
                                                            "out": np.int64, "arrival": np.float64})
        SequenceRunner.__init__(self, capacity, [self.stage])  # (_use_stream took the source)

    @property
    def used(self):
        """Sessions' slots (held between chunks) and the rows of requests without a session."""
        return self.pool.used + sum(1 for r in self.stage.reqs if r.session is None)

    def admit(self, reqs):
        kept, failed = self._with_fronts(reqs)
        statuses = dict(zip((r.id for r in kept), super().admit(kept)))
        return [failed.get(r.id, statuses.get(r.id)) for r in reqs]

    def _admit(self, req):
        frames = self._chunk(req)
        if frames is DONE or frames is NO_ROOM:
            return frames
        usable = len(frames)
        req.progress["frames"] = (self.frames.put(frames), usable)
        req.progress["out"] = self.outputs.alloc(usable)
        rows = self.stage.add([req], offset=req.progress["frames"][0], length=usable, pos=0, out=req.progress["out"],
                              arrival=req.arrival)
        state = self._start_state(req)
        for name, value in (state or {}).items():
            self.stage.states[name][rows] = value
        return ADMITTED

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
        finished, ys, states = [], [], []
        for i in done:
            req = st.reqs[a + i]
            o, n = st["out"][a + i], length[i]
            state = {name: np.array(arr[a + i]) for name, arr in st.states.items()}
            self._keep(req, state)
            finished.append(req)
            ys.append(self.outputs.data[o:o + n].copy())
            states.append(state)
        if finished:
            with self._source_compute():
                results = self._results(finished, ys, states)
            for req, result in zip(finished, results):
                req.result = result
        self._leave(st, a + done, out)
        self.last_rows = b - a
        return out

    def _run(self, rows, t: int, pad: int) -> None:
        """t steps of every layer for the stage rows `rows` (a slice runs in place, padded by `pad` rows)."""
        st = self.stage
        index = (st["offset"][rows] + st["pos"][rows])[:, None] + np.arange(t)
        xs = self.frames.data[index].transpose(1, 0, 2)
        start = time.perf_counter()
        wide, xs = self._widened(rows, xs, pad)
        ys = stack_steps(self.rnn, st, self.names, xs, wide)[:, : len(index)]
        self.kernel_seconds += time.perf_counter() - start
        out = (st["out"][rows] + st["pos"][rows])[:, None] + np.arange(t)
        self.outputs.data[out] = ys.transpose(1, 0, 2)
        st["pos"][rows] += t


class NativeStreamRunner(StreamChunks, NativeLoopRunner):
    """StreamRunner's core on the native step loop (engine/steploop.py): its rows, frames, blocks and
    outputs live in native code and step without the GIL; the front, the head and the sessions stay here.
    Runs every unidirectional stack native_layers takes (LSTM, GRU, SRU, QRNN)."""

    cell_types = ("block",)

    def __init__(self, source, capacity: int, block_steps: int, layers: list):
        self._use_stream(source, capacity, block_steps)
        NativeLoopRunner.__init__(self, capacity)
        self.loop.add_frame_stage(self.rnn.input_size, layers, self.block_steps)
        names = [name for layer in self.names for name in layer]
        ends = np.cumsum([self.widths[name] for name in names]).tolist()
        self._parts = list(zip(names, [0, *ends[:-1]], ends))  # each state's slice of a row's flat state
        self._lock = threading.Lock()  # admission runs on the submitting thread too: one at a time
        self._sessionless = 0  # running requests without a session (sessions count by their slots)
        # a front batched at admission runs on the engine's thread, over every request admitted together
        self.admit_on_submit = not self.front_at_admission

    @property
    def used(self):
        return self.pool.used + self._sessionless

    def admit(self, reqs):
        with self._lock:
            kept, failed = self._with_fronts(reqs)
            statuses, rows, blocked = {}, [], False
            for req in kept:
                if blocked:  # none after the first without room: arrival order
                    statuses[req.id] = NO_ROOM
                    continue
                try:
                    frames = self._chunk(req)
                except Exception as exc:  # noqa: BLE001 (it fails alone)
                    statuses[req.id] = exc
                    continue
                if frames is DONE or frames is NO_ROOM:
                    statuses[req.id], blocked = frames, frames is NO_ROOM
                    continue
                state = self._start_state(req)
                initial = None if state is None else np.concatenate(
                    [np.asarray(state[name], np.float32).reshape(-1) for layer in self.names for name in layer])
                req.progress["row"] = row = next(self._ids)
                self._reqs[row] = req
                self._sessionless += req.session is None
                marks = None
                if req.payload.marks is not None:  # (after the frames a session held back, if any)
                    marks = [m + len(frames) - len(req.payload.frames) for m in req.payload.marks]
                rows.append((0, row, req.ticket, req.arrival, np.ascontiguousarray(frames, np.float32), initial,
                             req.traced, marks))
                statuses[req.id] = ADMITTED
            self.loop.admit_frames(rows)  # together: they join at the same step
        return [failed.get(r.id, statuses.get(r.id)) for r in reqs]

    def close_session(self, session):
        with self._lock:
            super().close_session(session)

    def _left(self, req):
        with self._lock:
            self._sessionless -= req.session is None

    @property
    def merges_chunks(self) -> bool:
        """A session's message of several chunks runs as one request of all their frames (marks keep each
        chunk's state): one admission, one row and one answer instead of one per chunk, taken in one step
        loop pass instead of one round trip per chunk. Blocks of one frame only: a chunk's frames need not
        fill whole blocks."""
        return self.block_steps == 1

    def _state(self, values: np.ndarray) -> dict:
        """A row's flat state as {state name: its part} (views)."""
        return {name: values[a:b] for name, a, b in self._parts}

    def _set_results(self, finished):
        """The head over every request (each chunk of a message) that finished together; a request whose
        head fails fails alone."""
        owners, pieces, ys, states = [], [], [], []
        with self._lock:
            for req, (outputs, final, marked), _ in finished:
                state = self._state(np.frombuffer(final, np.float32).copy())
                self._keep(req, state)
                y = np.frombuffer(outputs, np.float32).reshape(-1, self.rnn.output_size).copy()
                if req.payload.chunks is None:
                    owners.append((req, 1))
                    pieces.append(req)
                    ys.append(y)
                    states.append(state)
                    continue
                marks = req.payload.marks
                kept = np.frombuffer(marked, np.float32).copy().reshape(len(marks), -1)
                owners.append((req, len(req.payload.chunks)))
                pieces += _pieces(req)
                ys += np.split(y[len(y) - len(req.payload.frames):], marks)  # (held-back frames: their own)
                states += [self._state(k) for k in kept] + [state]
        with self._source_compute():
            try:
                results = self._results(pieces, ys, states)
            except Exception:  # noqa: BLE001 (find the one that fails)
                results, at = [], 0
                for req, n in owners:
                    try:
                        results += self._results(pieces[at:at + n], ys[at:at + n], states[at:at + n])
                    except Exception as exc:  # noqa: BLE001
                        req.error = exc
                        results += [None] * n
                    at += n
        at = 0
        for req, n in owners:
            req.result = results[at] if req.payload.chunks is None else ChunkResults(results[at:at + n])
            at += n


class ChunkResults(list):
    """The results of a message's chunks, in order (the server joins them as it joins a request's rows)."""


def _chunks_of(payload: Frames) -> list[dict]:
    return payload.chunks if payload.chunks is not None else [payload.inputs]


def _set_chunk_frames(payload: Frames, frames: list[np.ndarray]) -> None:
    payload.frames = np.concatenate(frames) if len(frames) > 1 else frames[0]
    payload.marks = np.cumsum([len(f) for f in frames])[:-1].tolist()
    if any(len(f) == 0 for f in frames):
        raise ValueError("every chunk of a message needs at least one frame")


def _pieces(req) -> list[SimpleNamespace]:
    """A message's chunks as _results takes requests: each its inputs, its session, and the snapshot for
    the last one when asked."""
    last = len(req.payload.chunks) - 1
    return [SimpleNamespace(payload=SimpleNamespace(inputs=inputs), session=req.session,
                            snapshot=req.snapshot and i == last) for i, inputs in enumerate(req.payload.chunks)]


class BidirectionalRunner(FrameSequenceRunner):
    """A bidirectional stack over whole sequences: each layer's forward and backward directions are two
    stages, each stepped over many requests at once, in blocks of `block_steps` frames. A request enters
    layer l + 1 once both directions have covered layer l (the layer's output at a step needs both).
    Layer l reads arena `seq[l]` and writes its outputs, forward half then backward half, into
    `seq[l + 1]`; the top layer's outputs and every cell's final state go to the source's result_of."""

    def __init__(self, source, capacity: int, block_steps: int = 1):
        rnn = source.rnn
        if not rnn.bidirectional:
            raise ValueError("BidirectionalRunner runs bidirectional RNNs")
        self.cell_types = tuple(f"l{l}.{d}" for l in range(rnn.num_layers) for d in ("forward", "backward"))
        self.cells = {name: rnn.cells[i] for i, name in enumerate(self.cell_types)}
        self.state_names = {name: [f"s{i}" for i in range(len(cell.state_widths()))]
                            for name, cell in self.cells.items()}
        self.seq = [Arena(rnn.input_size, np.float32)] + [Arena(rnn.output_size, np.float32)
                                                          for _ in range(rnn.num_layers)]
        stages = [Stage(name, capacity, {f"s{i}": w for i, w in enumerate(cell.state_widths())},
                        {"src": np.int64, "dst": np.int64, "length": np.int64, "pos": np.int64, "arrival": np.float64})
                  for name, cell in self.cells.items()]
        super().__init__(source, capacity, stages, block_steps)

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
        st, cell, names = self.stages[cell_type], self.cells[cell_type], self.state_names[cell_type]
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
            start = time.perf_counter()
            wide, xs = self._widened(rows, xs, pad)
            ys = stage_steps(cell, st, names, xs, wide)
            self.kernel_seconds += time.perf_counter() - start
            target.data[st["dst"][rows][:, None] + frame, direction * hidden:(direction + 1) * hidden] = \
                ys[:, : len(pos)].transpose(1, 0, 2)
            st["pos"][rows] += t

        self._blocks(st, a, b, pad_to, run)
        done = a + np.flatnonzero(st["pos"][a:b] >= st["length"][a:b])
        index = self.cell_types.index(cell_type)
        for row in done:
            st.reqs[row].progress["finals"][index] = tuple(st.states[name][row].copy() for name in names)
        for req in st.remove(done):
            req.progress["left"] -= 1
            if req.progress["left"]:
                continue
            if layer + 1 < self.rnn.num_layers:
                self._enter(req, layer + 1)
                continue
            top = req.progress["blocks"][-1][1]
            ys = self.seq[-1].data[top:top + len(req.payload)].copy()
            with self._source_compute():
                req.result = self.source.result_of(req.payload.inputs, ys, req.progress["finals"])
            self._free(req)
            out.append(req)
        self.last_rows = b - a
        return out


def frames_runner(source, capacity: int, block_steps: int = 1, step_loop: str = "native"):
    """The runner for a frame-sequence source: bidirectional stacks read whole sequences, others stream, on
    the native loop where it runs the core (step_loop native: unidirectional stacks)."""
    if source.rnn.bidirectional:
        return BidirectionalRunner(source, capacity, block_steps)
    layers = native_layers(source.rnn) if step_loop == "native" else None
    if layers:
        return NativeStreamRunner(source, capacity, block_steps, layers)
    return StreamRunner(source, capacity, block_steps)
