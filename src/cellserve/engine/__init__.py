"""The scheduler: state pool, cellular batcher, and the graph-batching and no-batching baselines."""

from cellserve.engine.pool import StatePool
from cellserve.engine.request import EngineError, EngineFull, EngineStopped, Request
from cellserve.engine.runners import LanguageModelRunner, Runner, Seq2SeqRunner, TreeRunner, make_runner
from cellserve.engine.scheduler import POLICIES, Engine

__all__ = ["StatePool", "EngineError", "EngineFull", "EngineStopped", "Request", "LanguageModelRunner", "Runner",
           "Seq2SeqRunner", "TreeRunner", "make_runner", "POLICIES", "Engine"]
