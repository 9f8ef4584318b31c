"""A served model: a model family (families/) behind the protocol, with its engine and statistics. It
turns input tensors into engine requests (one per batch row) and engine results back into output
tensors, and carries what every family shares: metadata and config in Triton's shape, and a session's
snapshot as the sequence_snapshot tensor."""

from __future__ import annotations

import numpy as np

from cellserve.engine import Engine
from cellserve.families import family_for
from cellserve.server.config import TRITON_TYPES, ModelConfig
from cellserve.server.protocol import ProtocolError
from cellserve.server.snapshot import architecture_hash, from_text, to_text
from cellserve.server.stats import InferenceStats


class ServedModel:
    platform = "cellserve"

    def __init__(self, name: str, model, config: ModelConfig):
        self.name, self.model, self.config = name, model, config
        self.version = "1"
        self.versions: list[str] | None = None  # every version in the repository (default: the served one)
        self.family = family_for(model, **config.family_options())
        self.architecture = architecture_hash(model)
        self.stats = InferenceStats()
        runner = self.family.runner(config.capacity, config.block_steps, config.step_loop)
        self.engine = Engine(runner, config=config.engine_config())
        self.lane_sessions = lambda: 0  # sessions a native front end's lane holds for it (server/native)

    @property
    def sessions(self) -> int:
        """Open sessions: the engine's and a native lane's."""
        return self.engine.sessions + self.lane_sessions()

    @property
    def stateful(self) -> bool:
        return self.family.stateful

    @property
    def inputs(self):
        return self.family.inputs

    @property
    def outputs(self):
        return self.family.outputs

    def metadata(self) -> dict:
        return {"name": self.name, "versions": self.versions or [self.version], "platform": self.platform,
                "inputs": [s.metadata() for s in self.inputs], "outputs": [s.metadata() for s in self.outputs],
                "parameters": {"architecture": self.model.config()["arch"], "policy": self.config.policy,
                               "stateful": self.stateful, "block_steps": self.config.block_steps}}

    def listen_input(self) -> dict | None:
        """What the live page's microphone panel sends: {"input", "samples", "rate"} for a stateful model whose
        streaming input is FP32 rows of a fixed sample count (Silero VAD: 512 at 16 kHz), else None."""
        inputs = [s for s in self.inputs if s.name != "sequence_snapshot"]
        if not self.stateful or not inputs or inputs[0].datatype != "FP32" or len(inputs[0].shape) != 2 \
                or inputs[0].shape[1] < 1:
            return None
        return {"input": inputs[0].name, "samples": inputs[0].shape[1],
                "rate": int(self.config.controls.get("sr", 16000))}

    def model_config(self) -> dict:
        """The model's configuration in Triton's JSON shape (GET /v2/models/<m>/config)."""
        def tensors(specs):
            return [{"name": s.name, "data_type": TRITON_TYPES.get(s.datatype, "TYPE_INVALID"), "dims": s.shape,
                     **({"optional": True} if s.optional else {})} for s in specs]

        config = {"name": self.name, "platform": self.platform, "backend": self.config.backend,
                  "max_batch_size": self.config.max_batch, "input": tensors(self.inputs),
                  "output": tensors(self.outputs),
                  "parameters": {"architecture": {"string_value": self.model.config()["arch"]},
                                 "policy": {"string_value": self.config.policy}}}
        if self.stateful:
            config["sequence_batching"] = {"max_sequence_idle_microseconds": int(self.config.idle_timeout_s * 1e6)}
        else:
            config["dynamic_batching"] = {"max_queue_delay_microseconds": int(self.config.max_delay_ms * 1000)}
        return config

    def requests(self, tensors: dict[str, np.ndarray]) -> list[dict]:
        """A request's tensors as engine requests; ProtocolError names what does not fit the model."""
        try:
            requests = self.family.requests(tensors)
        except ValueError as exc:
            raise ProtocolError(str(exc))
        if not requests:
            raise ProtocolError("the request has no rows (its batch dimension is 0)")
        return requests

    def restore_of(self, tensors) -> dict:
        """The session state in the request's sequence_snapshot tensor (sequence_restore)."""
        blob = tensors.get("sequence_snapshot")
        if blob is None or blob.size != 1 or blob.dtype != object:
            raise ProtocolError("sequence_restore needs the snapshot as input 'sequence_snapshot' (BYTES, shape [1])")
        return from_text(blob.reshape(-1)[0], self.name, self.architecture)

    def outputs_of(self, results: list) -> tuple[dict[str, np.ndarray], dict]:
        """(output tensors, response parameters). A session's request also returns its state when asked
        (sequence_snapshot, as of its last chunk) and, for a single chunk, the frames it holds back for a
        full block (frames_pending)."""
        outputs, parameters, last = self.family.outputs_of(results), {}, results[-1]
        if "snapshot" in last:  # (a session request's last chunk)
            outputs["sequence_snapshot"] = np.array([to_text(self.name, self.architecture, last["snapshot"])],
                                                    dtype=object)
        if "frames_pending" in last and len(results) == 1:
            parameters["frames_pending"] = last["frames_pending"]
        return outputs, parameters
