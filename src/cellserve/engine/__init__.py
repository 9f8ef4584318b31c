"""The engine: requests in, batched cell steps out. Nothing here knows of HTTP, gRPC or model files.

  runner.py     the Runner interface (what a model family's execution gives the engine) and shared
                sequence machinery; frames.py, the runners of frame-sequence models (stream, bidirectional)
  batch.py      persistent per-stage batches; pool.py, state slots and arenas
  policies.py   cellular / graph / none, and EngineConfig
  scheduler.py  the Engine: queue, running set, sessions, the step loop
  request.py    a request inside the engine, sessions, and the errors callers see
"""

from cellserve.engine.frames import BidirectionalRunner, StreamRunner, frames_runner
from cellserve.engine.policies import POLICIES, EngineConfig
from cellserve.engine.pool import StatePool
from cellserve.engine.request import EngineError, EngineFull, EngineStopped, Request
from cellserve.engine.runner import Runner
from cellserve.engine.scheduler import Engine

__all__ = ["BidirectionalRunner", "StreamRunner", "frames_runner", "POLICIES", "EngineConfig", "StatePool",
           "EngineError", "EngineFull", "EngineStopped", "Request", "Runner", "Engine"]
