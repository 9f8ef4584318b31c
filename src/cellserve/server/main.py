"""`cellserve serve` in this process: the repository (all its models, or in explicit model control the ones
named), HTTP and gRPC over one backend, restricted API groups, TLS on both wires, and a clean exit on
SIGTERM. Setup problems are ValueErrors the command reports as usage errors."""

from __future__ import annotations

import shutil
import ssl
from pathlib import Path

import uvicorn

from cellserve.server.app import create_app
from cellserve.server.auth import parse_restriction
from cellserve.server.background import DrainingServer, http_frontend_of, native_http_config
from cellserve.server.presets import PRESETS, preset
from cellserve.server.repository import Repository


def repository_for(model_dir: str | None, model_control: str = "none", load_models=(),
                   settings: dict | None = None) -> Repository:
    """What `serve` serves: a repository folder, one model file (configured by `settings`), a preset's model
    (server/presets.py: `silero-vad`), or the embedded models."""
    if load_models and model_control != "explicit":
        raise ValueError("--load-model goes with --model-control-mode explicit")
    try:
        if model_dir and not Path(model_dir).exists():
            found = preset(model_dir)
            if found is None:
                raise ValueError(f"{model_dir}: no such file or folder, nor a packaged model "
                                 f"({', '.join(sorted(PRESETS))})")
            path, config = found
            return Repository.from_path(path, {**config, **(settings or {})}, name=model_dir)
        if model_dir and model_control == "explicit" and Path(model_dir).is_dir():
            if settings:
                raise ValueError("--config and --set configure a single model file, not a repository folder")
            return Repository.from_directory(model_dir, only=list(load_models))
        if not model_dir and settings:
            raise ValueError("--config and --set configure a single model file: name one")
        return Repository.from_path(model_dir, settings) if model_dir else Repository.defaults()
    except OSError as exc:
        raise ValueError(str(exc))


def serve(repository: Repository, host: str, port: int, grpc_port: int, max_body_bytes: int,
          model_control: str = "none", restricted_api=(), ssl_certfile: str | None = None,
          ssl_keyfile: str | None = None, ssl_ca_certfile: str | None = None, exit_timeout_s: float = 30.0,
          log_level: str = "info", frontend: str | None = None) -> None:
    """Logging is configured by the caller (cli: configure_logs); log_level only sets uvicorn's."""
    if not 0 <= grpc_port <= 65535:
        raise ValueError("--grpc-port must be in [0, 65535] (0 turns gRPC off)")
    restricted = tuple(parse_restriction(text) for text in restricted_api)
    if bool(ssl_certfile) != bool(ssl_keyfile) or (ssl_ca_certfile and not ssl_certfile):
        raise ValueError("TLS needs --ssl-certfile and --ssl-keyfile (and --ssl-ca-certfile only with them)")
    tls = {"certfile": ssl_certfile, "keyfile": ssl_keyfile, "ca_certfile": ssl_ca_certfile} if ssl_certfile else None
    app = create_app(repository, max_body_bytes=max_body_bytes, grpc_port=grpc_port or None, grpc_host=host,
                     model_control=model_control, restricted=restricted, tls=tls, grpc_frontend=frontend)
    https = {"ssl_certfile": ssl_certfile, "ssl_keyfile": ssl_keyfile} if tls else {}
    if ssl_ca_certfile:
        https.update(ssl_ca_certs=ssl_ca_certfile, ssl_cert_reqs=ssl.CERT_REQUIRED)
    http_frontend, folder = http_frontend_of(frontend), None
    if http_frontend == "native":  # (the native front end takes the port; uvicorn serves it on a Unix socket)
        listen, folder = native_http_config(app, host, port, https)
    else:
        listen = {"host": host, "port": port, **https}
    base = f"{'https' if tls else 'http'}://{host}:{port}"
    grpc = (f"; gRPC (KServe v2 / Triton{', TLS' if tls else ''}) on {host}:{grpc_port}, "
            f"{app.state.grpc_frontend} front end" if grpc_port else "")
    print(f"cellserve {', '.join(repository.models)} on {base} ({http_frontend} HTTP front end): inference "
          f"{base}/v2/models/<name>/infer, metrics {base}/metrics, API docs {base}/docs{grpc}", flush=True)
    try:
        DrainingServer(uvicorn.Config(app, log_level=log_level, log_config=None, access_log=False,
                                      timeout_graceful_shutdown=exit_timeout_s, **listen), app.state.backend).run()
    finally:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
