"""Scale-out on Ray Serve: N engine shards behind one HTTP ingress.

Each shard is its own single-replica deployment running our engines, because a streaming session's
recurrent state lives in one engine's state pool: the ingress sends every chunk of a sequence to the
shard chosen by a stable hash of its sequence_id, and spreads stateless requests round-robin. The router
implements the same Backend protocol as LocalBackend (backend.py), so HTTP and gRPC both work through it. (Ray
Serve's own replica routing has no strict affinity, so shards are separate deployments.) Ray places the
shards on any node of the cluster: see docs/ray.md. Needs `ray[serve]` (the `ray` extra).
"""

from __future__ import annotations

import itertools
import re
import zlib

from ray import serve

from cellserve.server.app import create_app
from cellserve.server.repository import Repository
from cellserve.server.backend import DEFAULT_PENDING_CHUNKS, LocalBackend, Parsed, ServiceError
from cellserve.server.protocol import InferRequest, InferResponse, ProtocolError
from cellserve.server.telemetry import configure_telemetry


def _repository(model_dir: str | None) -> Repository:
    return Repository.from_directory(model_dir) if model_dir else Repository.defaults()


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
class EngineShard:
    """One engine process: the models of the repository, served by LocalBackend."""

    def __init__(self, model_dir: str | None, index: int, max_body_bytes: int, telemetry: dict | None = None):
        if telemetry:  # the launcher's logs and tracing, in this replica's process
            configure_telemetry(**telemetry)
        self.backend = LocalBackend(_repository(model_dir), max_body_bytes, replica=index)
        self.backend.start()

    async def call(self, method: str, *args):
        """Run a LocalBackend method; refusals come back as (status, message) so they cross processes."""
        try:
            return 200, await getattr(self.backend, method)(*args)
        except ServiceError as exc:
            return exc.status, str(exc)

    def __del__(self):
        self.backend.stop()


def sequence_key(req: InferRequest) -> tuple[str | None, bool]:
    """The sequence_id a request names (None when it names none) and whether it restores a snapshot."""
    sid = req.parameters.get("sequence_id")
    return (None, False) if sid is None else (str(sid), req.parameters.get("sequence_restore") is True)


class ShardRouter:
    """The Backend the ingress talks to, answered by the shards. A sequence that was restored from a
    snapshot onto another shard (its own shard died) stays there."""

    def __init__(self, shards: list):
        self.shards = shards
        self._round_robin = itertools.cycle(range(len(shards)))
        self.moved: dict[str, int] = {}  # sequence_id -> shard, for sequences restored elsewhere

    def shard_for(self, key: str | None) -> int:
        if key is None:
            return next(self._round_robin)
        return self.moved.get(key, zlib.crc32(key.encode()) % len(self.shards))

    async def _call(self, shard: int, method: str, *args):
        status, value = await self.shards[shard].call.remote(method, *args)
        if status != 200:
            raise ServiceError(status, value)
        return value

    async def infer(self, name: str, request: Parsed, version: str | None = None) -> InferResponse:
        try:
            req = request() if callable(request) else request
        except ProtocolError as exc:
            raise ServiceError(400, str(exc))
        key, restore = sequence_key(req)
        shard = self.shard_for(key)
        try:
            return await self._call(shard, "infer", name, req, version)
        except ServiceError:
            raise
        except Exception:  # the shard is gone: a sequence opened from a snapshot may go to another
            if not restore or len(self.shards) == 1:
                raise ServiceError(503, f"the engine shard holding sequence {key!r} is unavailable; restore the "
                                        "sequence from a snapshot (sequence_restore)" if key else "shard unavailable")
            other = (shard + 1) % len(self.shards)
            result = await self._call(other, "infer", name, req, version)
            self.moved[key] = other
            return result

    def pending_limit(self, name: str) -> int:
        return DEFAULT_PENDING_CHUNKS  # (the shards' own settings are not known here)

    async def server_metadata(self) -> dict:
        return await self._call(0, "server_metadata")

    async def ready(self) -> bool:
        return all([await self._call(i, "ready") for i in range(len(self.shards))])

    async def model_metadata(self, name: str, version: str | None = None) -> dict:
        return await self._call(0, "model_metadata", name, version)

    async def model_ready(self, name: str, version: str | None = None) -> bool:
        return all([await self._call(i, "model_ready", name, version) for i in range(len(self.shards))])

    async def model_config(self, name: str, version: str | None = None) -> dict:
        return await self._call(0, "model_config", name, version)

    async def statistics(self, name: str | None = None, version: str | None = None) -> dict:
        return {"model_stats": [s for i in range(len(self.shards))
                                for s in (await self._call(i, "statistics", name, version))["model_stats"]]}

    async def repository_index(self, ready_only: bool = False) -> list[dict]:
        return await self._call(0, "repository_index", ready_only)

    async def load(self, name: str) -> None:
        for i in range(len(self.shards)):
            await self._call(i, "load", name)

    async def unload(self, name: str) -> None:
        for i in range(len(self.shards)):
            await self._call(i, "unload", name)

    async def metrics_text(self) -> bytes:
        texts = [(await self._call(i, "metrics_text")).decode() for i in range(len(self.shards))]
        return merge_metrics(texts).encode()

    async def live(self, window_s: float | None = None) -> dict:
        """Each shard's models, named with their replica."""
        views = [await self._call(i, "live", window_s) for i in range(len(self.shards))]
        return {**views[0], "models": {f"{name} (replica {i})": model for i, view in enumerate(views)
                                       for name, model in view["models"].items()}}


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?( .*)$")


def merge_metrics(texts: list[str]) -> str:
    """Shards' Prometheus exports as one, each sample labelled replica="i" (HELP/TYPE lines once)."""
    families: dict[str, list[str]] = {}
    order: list[str] = []
    for replica, text in enumerate(texts):
        current = None
        for line in text.splitlines():
            if line.startswith("# HELP "):
                current = line.split()[2]
                if current not in families:
                    families[current] = [line]
                    order.append(current)
            elif line.startswith("# TYPE "):
                if replica == 0:
                    families[current].append(line)
            elif line and current is not None:
                match = _SAMPLE.match(line)
                if match:
                    name, labels, rest = match.groups()
                    inner = f'replica="{replica}"' + ("," + labels[1:-1] if labels and labels != "{}" else "")
                    families[current].append(f"{name}{{{inner}}}{rest}")
    return "\n".join(line for name in order for line in families[name]) + "\n"


_ingress: dict[str, ShardRouter] = {}


def ingress_router() -> ShardRouter:
    """The replica's router. Module-level functions are pickled by reference, so inside the replica this
    and bind_router share the replica's module state (the Ingress class itself is pickled by value)."""
    return _ingress["router"]


def bind_router(router: ShardRouter) -> None:
    _ingress["router"] = router


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress(create_app(None, backend_provider=ingress_router))
class Ingress:
    def __init__(self, *shards, telemetry: dict | None = None):
        if telemetry:  # its access lines and request spans: the HTTP front end runs here
            configure_telemetry(**telemetry)
        bind_router(ShardRouter(list(shards)))


def shard_router(app_name: str, replicas: int) -> ShardRouter:
    """A router over the shards of a running application, for a front end outside the ingress (the gRPC
    service of `cellserve serve --ray`)."""
    return ShardRouter([serve.get_deployment_handle(f"cellserve-shard-{i}", app_name=app_name)
                        for i in range(replicas)])


def build(model_dir: str | None = None, replicas: int = 2, max_body_bytes: int = 16 * 2**20,
          telemetry: dict | None = None):
    """The Ray Serve application: `replicas` engine shards and the HTTP ingress. telemetry: configure_telemetry's
    settings, applied in every replica (each is a process of its own)."""
    shards = [EngineShard.options(name=f"cellserve-shard-{i}").bind(model_dir, i, max_body_bytes, telemetry)
              for i in range(replicas)]
    return Ingress.options(name="cellserve-ingress").bind(*shards, telemetry=telemetry)


def run(model_dir: str | None, replicas: int, host: str, port: int, grpc_port: int = 0,
        max_body_bytes: int = 16 * 2**20, telemetry: dict | None = None) -> None:
    """Serve on Ray Serve (joining RAY_ADDRESS if set) until stopped: HTTP through the ingress, and with a
    grpc_port the gRPC service in this process over a router to the same shards."""
    import asyncio
    import os

    import ray

    from cellserve.server.grpc_service import start_grpc

    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build(model_dir, replicas, max_body_bytes, telemetry), name="cellserve", route_prefix="/", blocking=not grpc_port)
    if grpc_port:
        router = shard_router("cellserve", replicas)

        async def serve_grpc():
            server, _ = await start_grpc(lambda: router, host, grpc_port)
            await server.wait_for_termination()

        asyncio.run(serve_grpc())

