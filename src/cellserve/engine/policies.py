"""Batching policies and the engine's settings. All policies run over the same runner and kernels.

  cellular  a bounded running set (max_running requests, like vLLM's max_num_seqs; 2 x max_batch by
            default) is filled from the queue oldest first between steps; each step runs one cell type
            (stage) on up to max_batch of its ready rows, and requests leave the moment they finish
            (BatchMaker's cellular batching). Which stage runs (pick, by default the runner's):
              stage    the later stage (decoder before encoder, internal nodes before leaves), so
                       in-flight requests finish sooner, unless an earlier stage would run a batch
                       more than twice as full (sequence models' default); while requests wait for
                       a full running set, the fullest stage;
              fullest  the stage with the most ready rows; oldest: the stage of the oldest request
                       (trees' default);
              earliest while the running requests fit one step's batch, the fullest stage, ties going
                       to the earliest (encoder before decoder), so a new request joins the later stage's
                       batch soonest; beyond that, as stage. The default where a later stage's step costs
                       nearly the same for 1 row as for a full batch (a wide decoder reading its weights
                       from memory), measured when the runner is built (families/seq2seq.py).
            Whatever the pick, a stage with ready rows that has not run for max_wait_steps steps runs
            next, and a stage's rows take turns in windows of max_batch, so no request starves.
  graph     request-level dynamic batching: wait up to max_delay_ms or max_batch requests (optionally
            from one length bucket), then run every stage to completion with finished requests as
            padding rows, and answer all requests together (TF-Serving / Triton / Clipper style).
  none      one request at a time, start to finish.
"""

from __future__ import annotations

from dataclasses import dataclass

PICKS = ("stage", "fullest", "oldest", "earliest")


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine is told; the server builds one from a model's config and passes it whole.
    threads: cores each batched step's products are split across (set on the scheduler thread).
    max_running: cellular's bound on requests in flight (default 2 x max_batch, within the runner's
    capacity). max_sessions: open streaming sessions allowed at once (default: the runner's capacity);
    past it a new sequence is refused, never made room for by evicting another."""

    policy: str = "cellular"
    max_batch: int = 32
    max_queue: int = 1024
    max_delay_ms: float = 5.0
    length_buckets: tuple[int, ...] = ()
    idle_timeout_s: float = 60.0
    max_wait_steps: int = 8
    pick: str | None = None
    threads: int = 1
    max_running: int | None = None
    tune_gc: bool = True
    max_sessions: int | None = None

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.pick is not None and self.pick not in PICKS:
            raise ValueError(f"pick must be one of {PICKS}, got {self.pick!r}")
        if self.max_batch < 1 or self.max_queue < 1 or self.threads < 1 or (
                self.max_running is not None and self.max_running < 1):
            raise ValueError("max_batch, max_queue, max_running and threads must be >= 1")


class Cellular:
    """Cell-level batching over a bounded running set (see the module doc). With a native step loop the
    engine's worker (engine/steploop.py) makes the same picks on its own thread, and round() is not used."""

    name = "cellular"

    def __init__(self, config: EngineConfig):
        self.max_batch = config.max_batch
        self.running = config.max_running or 2 * self.max_batch
        self.admit_batch = max(1, self.max_batch // 8)  # admit in batches: fixed costs per call, not per request

    def round(self, engine) -> None:
        room = engine.max_running - engine.active
        if room >= self.admit_batch or not engine.active:
            engine.admit(engine.max_running)
        cell_type = self.pick(engine)
        if cell_type is None:  # e.g. only chunks whose frames all wait for a full block: done at admission
            return
        engine.retire(engine.run(cell_type, self.max_batch, 0))

    def pick(self, engine) -> str | None:
        runner, steps, last_run = engine.runner, engine.stats.steps, engine.last_run
        ready = [(t, runner.ready(t)) for t in runner.cell_types]
        ready = [(t, min(n, self.max_batch)) for t, n in ready if n]
        if len(ready) <= 1:
            return ready[0][0] if ready else None
        starving = [t for t, _ in ready if steps - last_run[t] > engine.max_wait_steps]
        if starving:
            return min(starving, key=last_run.get)
        if engine.pick == "oldest":
            return min((t for t, _ in ready), key=runner.oldest)
        fullest = max(n for _, n in ready)
        queued_full = engine.queued and engine.active >= engine.max_running
        if engine.pick == "earliest" and not queued_full and engine.active <= self.max_batch:
            return next(t for t, n in ready if n == fullest)
        if engine.pick == "fullest" or queued_full:
            return next(t for t, n in reversed(ready) if n == fullest)
        return next(t for t, n in reversed(ready) if 2 * n >= fullest)  # later stages come last in ready


class Graph:
    """Request-level dynamic batching with padding (see the module doc)."""

    name = "graph"
    waits = True  # for a fuller batch, up to max_delay_ms

    def __init__(self, config: EngineConfig):
        self.max_batch = config.max_batch
        self.running = self.max_batch
        self.max_delay = config.max_delay_ms / 1000.0

    def round(self, engine) -> None:
        first = engine.oldest_queued()
        if first is None:
            return
        bucket = engine.bucket(first) if engine.length_buckets else None
        deadline = first.arrival + self.max_delay
        if self.waits:
            engine.wait_for(bucket, self.max_batch, deadline)
        engine.admit(self.max_batch, bucket)
        runner = engine.runner
        pad_to = engine.active if runner.pads else 0
        done = []
        if engine.native:  # the same steps, in one call of the native loop
            done = engine.run_steps(1 << 30, pad_to)
        for cell_type in runner.cell_types:
            while runner.ready(cell_type):
                done += engine.run(cell_type, 1 << 30, pad_to)
        engine.retire(done)  # all at once: the whole batch answers together


class Unbatched(Graph):
    """One request at a time, start to finish."""

    name = "none"
    waits = False

    def __init__(self, config: EngineConfig):
        super().__init__(config)
        self.max_batch = self.running = 1


POLICY_CLASSES = {cls.name: cls for cls in (Cellular, Graph, Unbatched)}
POLICIES = tuple(POLICY_CLASSES)  # their names
