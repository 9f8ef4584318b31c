"""Run the app under uvicorn: on a background thread (the demo, tests, benchmarks), or as the process's server
with a clean exit (DrainingServer)."""

from __future__ import annotations

import contextlib
import signal
import threading
import time

import uvicorn


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
    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, **ssl):
        """ssl: uvicorn's ssl_certfile, ssl_keyfile, ssl_ca_certs, ssl_cert_reqs."""
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    lifespan="on", timeout_graceful_shutdown=15, **ssl))
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
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
