"""The tree family: a tree (a token per node, parents[i] the parent of node i, -1 at the root) in, the
root's class logits out. Leaves and internal nodes are two cell types; a node is ready once its
children are done, so trees of any shape batch level by level across requests. The native step loop runs
them by default (NativeTreeRunner); TreeRunner, the Python loop, is its reference."""

from __future__ import annotations

import collections
import threading
import time

import numpy as np

from cellserve.engine.pool import StatePool
from cellserve.engine.request import Request
from cellserve.engine.runner import ADMITTED, NO_ROOM, Runner, token_array
from cellserve.engine.steploop import NativeLoopRunner
from cellserve.families.base import Family, TensorSpec, token_rows
from cellserve.models import TreeLSTM, tree_levels


class TreeFamily(Family):
    arch = "treelstm"
    inputs = [TensorSpec("tokens", "INT64", [-1]), TensorSpec("parents", "INT64", [-1])]
    outputs = [TensorSpec("logits", "FP32", [1, -1])]

    def runner(self, capacity, block_steps=1, step_loop="native"):
        if step_loop == "native":
            return NativeTreeRunner(self.model, capacity)
        return TreeRunner(self.model, capacity)

    def requests(self, tensors):
        self.check_names(tensors)
        tokens, parents = (token_rows(tensors[n], n) for n in ("tokens", "parents"))
        if tokens.shape[0] != 1 or parents.shape[0] != 1:
            raise ValueError("one tree per request: tokens and parents of shape [nodes]")
        return [{"tokens": tokens[0], "parents": parents[0]}]

    def outputs_of(self, results):
        return {"logits": np.array([r["logits"] for r in results], dtype=np.float32)}


class TreeRunner(Runner):
    """Leaves and internal nodes are two cell types; a node is ready once its children are done. A tree's
    nodes take contiguous pool slots [base, base + n), with its parents, child lists (CSR), pending-child
    counts and tokens in per-slot arrays, so a step gathers children, stores states and finds the parents
    that became ready with array operations. Ready queues hold (slots, owner ids) chunks; a chunk entry
    whose slot changed owner (its tree was cancelled) is skipped."""

    cell_types = ("leaf", "internal")
    pads = False
    default_pick = "oldest"  # a tree's critical path is its depth: the oldest tree's nodes first (measured:
    # p90 54 vs 109 ms for "stage" at 449 req/s on the serving bench's TreeLSTM, 64 trees in flight). A ready
    # internal node carries its tree's arrival, not the time it became ready: with the latter, new trees'
    # leaves won every other step and a deep tree took twice its depth in steps (native loop, 240 and 285
    # req/s, two runs each: p90 35/35 and 66/142 ms against 35/162 and 97/84 before; graph 31-725 ms)

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
        tokens = token_array(inputs.get("tokens"), "tokens", self.model.embedding.vocab_size)
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
        ready = touched[p["waiting"][touched] == 0]
        if len(ready):  # their requests' age, so "oldest" picks the stage of the oldest request
            self._push("internal", ready, min(self.live[int(o)].arrival for o in np.unique(p["owner"][ready])))
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


class NativeTreeRunner(NativeLoopRunner):
    """TreeRunner's ready queues, cell steps and head in the native step loop (engine/steploop.py): trees
    keep their node states there and leave with their root's logits. Capacity counts nodes, as TreeRunner's
    pool does."""

    cell_types = TreeRunner.cell_types
    pads = False
    default_pick = TreeRunner.default_pick
    prepare = TreeRunner.prepare
    length = TreeRunner.length

    def __init__(self, model: TreeLSTM, capacity: int):
        super().__init__(capacity)
        self.model = model
        cell = model.cell
        self.loop.add_tree_stages(model.embedding.table, cell.wx.packed, cell.u_iou.packed, cell.u_f.packed,
                                  cell.bias, model.head.w.packed, model.head.bias)
        self._nodes = 0  # nodes of the trees held
        self._lock = threading.Lock()  # admission runs on the submitting thread too

    @property
    def used(self) -> int:
        return self._nodes

    def admit(self, reqs):
        statuses, trees = [], []
        with self._lock:
            for req in reqs:
                nodes = len(req.payload["parents"])
                if (statuses and statuses[-1] is NO_ROOM) or self._nodes + nodes > self.capacity:
                    statuses.append(NO_ROOM)  # (and every later one: arrival order)
                    continue
                self._nodes += nodes
                req.progress["row"] = row = next(self._ids)
                self._reqs[row] = req
                trees.append((row, req.ticket, req.arrival, req.payload["tokens"], req.payload["parents"], req.traced))
                statuses.append(ADMITTED)
            self.loop.admit_trees(trees)  # together: they join at the same step
        return statuses

    def _left(self, req):
        with self._lock:
            self._nodes -= len(req.payload["parents"])

    def _result(self, logits, next_token):
        return {"logits": logits}
