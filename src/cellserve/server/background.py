"""Run the app under uvicorn: on a background thread (the demo, tests, benchmarks), or as the process's server
with a clean exit (DrainingServer). With the native HTTP front end, uvicorn listens on a private Unix socket
and the native front end on the port (native_http_config)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time

import uvicorn

HTTP_FRONTENDS = ("native", "python")


def http_frontend_of(choice: str | None) -> str:
    """The HTTP front end to run: `choice`, else $CELLSERVE_HTTP_FRONTEND, else native where it was built."""
    from cellserve.server.native.grpc_front import _grpc_front

    choice = choice or os.environ.get("CELLSERVE_HTTP_FRONTEND") or None
    if choice not in (None, *HTTP_FRONTENDS):
        raise ValueError(f"--frontend is one of {', '.join(HTTP_FRONTENDS)}, not {choice!r}")
    built = _grpc_front is not None and getattr(_grpc_front, "HTTP", 0)
    if choice == "native" and not built:
        raise ValueError("--frontend native: this build has no native HTTP front end (Boost, RapidJSON or OpenSSL "
                         "was missing when cellserve was built; Debian/Ubuntu: apt-get install libboost-dev "
                         "rapidjson-dev libssl-dev, then reinstall)")
    return "native" if built and choice != "python" else "python"


def native_http_config(app, host: str, port: int, ssl: dict) -> tuple[dict, str]:
    """uvicorn's settings when the native front end takes the port: uvicorn on a Unix socket in a private
    folder, trusting the front end's X-Forwarded-* headers; the app's lifespan starts the front end
    (app.state.native_http). Returns (uvicorn's settings, the folder to remove at exit)."""
    folder = tempfile.mkdtemp(prefix="cellserve-http-")
    upstream = os.path.join(folder, "app.sock")
    tls = None
    if ssl.get("ssl_certfile"):
        tls = {"certfile": ssl["ssl_certfile"], "keyfile": ssl["ssl_keyfile"], "ca_certfile": ssl.get("ssl_ca_certs")}
    app.state.native_http = {"host": host, "port": port, "upstream": upstream, "tls": tls}
    return {"uds": upstream, "forwarded_allow_ips": "*", "proxy_headers": True}, folder


class DrainingServer(uvicorn.Server):
    """uvicorn for `cellserve serve`: on SIGTERM or SIGINT readiness turns false at once and new requests and
    sessions get 503 / UNAVAILABLE (the backend drains), accepted ones finish within the graceful timeout, and
    the process exits 0 (uvicorn re-raises the signal after its shutdown, which orchestrators record as a
    failure on every rolling restart)."""

    def __init__(self, config: uvicorn.Config, backend=None):
        super().__init__(config)
        self.backend = backend

    def handle_exit(self, sig, frame) -> None:
        if self.backend is not None and hasattr(self.backend, "begin_drain"):
            self.backend.begin_drain()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


class BackgroundServer:
    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, frontend: str | None = None, **ssl):
        """ssl: uvicorn's ssl_certfile, ssl_keyfile, ssl_ca_certs, ssl_cert_reqs. frontend: the HTTP front end
        (http_frontend_of)."""
        self.app, self.folder = app, None
        self.frontend = http_frontend_of(frontend)
        if self.frontend == "native":
            listen, self.folder = native_http_config(app, host, port, ssl)
        else:
            listen = {"host": host, "port": port, **ssl}
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                                    timeout_graceful_shutdown=15, **listen))
        self.scheme = "https" if ssl.get("ssl_certfile") else "http"
        self.thread = threading.Thread(target=self.server.run, name="cellserve-http", daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("HTTP server did not start")
            time.sleep(0.02)
        return self

    @property
    def port(self) -> int:
        if self.frontend == "native":
            return self.app.state.http_port
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)
