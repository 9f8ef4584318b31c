"""WebSocket streams: `GET /v2/models/{name}[/versions/{v}]/stream` upgrades to a WebSocket on which each
message is one inference request, answered in order. What a browser or a voice agent can open (neither can
speak gRPC without a proxy), on the HTTP port.

- A stateful model: one connection is one session. `?sequence_id=` names it (else the server does); the
  `X-Sequence-Id` response header says which. Its first good message opens it; closing the connection ends
  it once its last answers are computed.
- A text message is a KServe v2 JSON request body; its answer is the JSON response body. The server sets the
  session's parameters (a sequence_snapshot flag passes through).
- A binary message is the raw little-endian bytes of the model's streaming input (its first, or
  `?input=NAME`), shape [rows, ...] with the rows worked out from the byte count; the answer is the raw
  bytes of the first output (or `?output=NAME`). Silero VAD: Float32Array chunks of 512 samples in, one
  float32 probability per chunk out, the server keeping the 64-sample context.
- A bad message gets a text message {"error": "..."}; the session goes on from its last good chunk.
- Flow control: the server stops reading while max_pending_chunks of the connection's chunks are unanswered.

Requests are submitted as they are read (LocalBackend.infer_then: no task per message) and answered from a
writer that awaits them in order. This is the Python front end's implementation, and the reference."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid

import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect

from cellserve.server.auth import refusal
from cellserve.server.backend import ServiceError
from cellserve.server.telemetry import ACCESS, access_line, new_request_id
from cellserve.server.protocol import (DTYPES, HEADER_LENGTH, InferRequest, ProtocolError, build_response,
                                       parse_infer_request, to_binary)

SESSION_KEYS = ("sequence_id", "sequence_start", "sequence_end", "sequence_restore")  # the connection's to set
POLICY = 1008  # the close code of a refused connection (after its {"error": ...} message)


def add_stream_routes(app, current, restricted: tuple, max_message_bytes: int) -> None:
    @app.websocket("/v2/models/{name}/stream")
    @app.websocket("/v2/models/{name}/versions/{version}/stream")
    async def stream(websocket: WebSocket, name: str, version: str | None = None):
        await serve_stream(websocket, current(), name, version, restricted, max_message_bytes)


async def serve_stream(websocket: WebSocket, backend, name: str, version: str | None, restricted: tuple,
                       max_message_bytes: int) -> None:
    refused = refusal(list(restricted), "inference", websocket.headers) if restricted else None
    if refused is not None:
        return await _refuse(websocket, refused[1])
    if not hasattr(backend, "infer_then"):
        return await _refuse(websocket, "WebSocket streams are served by a local backend, not the Ray router")
    try:
        meta = await backend.model_metadata(name, version)
        stream = _Stream(backend, meta, name, version, websocket.query_params)
    except (ServiceError, ValueError) as exc:
        return await _refuse(websocket, str(exc))
    await websocket.accept(headers=[(b"x-sequence-id", stream.sid.encode())] if stream.sid else None)
    writer = asyncio.ensure_future(stream.answer(websocket))
    try:
        while True:
            await stream.room.wait()
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            data = message.get("bytes")
            text = message.get("text")
            if (len(data) if data is not None else len((text or "").encode())) > max_message_bytes:
                stream.reply_error(f"message exceeds the limit of {max_message_bytes} bytes")
            elif data is not None:
                stream.submit_binary(data)
            else:
                stream.submit_text(text or "")
    except WebSocketDisconnect:
        pass
    finally:
        stream.closed = True
        stream.queue.put_nowait(None)
        await writer
        stream.end()


def in_session(request: InferRequest, sid: str, start: bool) -> InferRequest:
    """A message of the connection's session: its session parameters are the connection's (a sequence_snapshot
    flag passes through). Also the native sessions' text messages (server/native/grpc_front.py)."""
    for key in SESSION_KEYS:
        request.parameters.pop(key, None)
    request.parameters.update(sequence_id=sid, sequence_start=start)
    return request


async def _refuse(websocket: WebSocket, message: str) -> None:
    await websocket.accept()
    await websocket.send_text(json.dumps({"error": message}))
    await websocket.close(code=POLICY)


class _Stream:
    """One connection: its session, what it reads and writes, and its answers in flight."""

    def __init__(self, backend, meta: dict, name: str, version: str | None, query):
        self.backend, self.name, self.version = backend, name, version
        self.stateful = bool(meta.get("parameters", {}).get("stateful"))
        self.sid = (query.get("sequence_id") or uuid.uuid4().hex) if self.stateful else None
        self.started = False
        inputs = [t for t in meta["inputs"] if t["name"] != "sequence_snapshot"]
        self.input = next((t for t in inputs if t["name"] == query.get("input", inputs[0]["name"])), None)
        if self.input is None:
            raise ValueError(f"model {name!r} has no input {query.get('input')!r}; it takes "
                             f"{[t['name'] for t in inputs]}")
        outputs = [t["name"] for t in meta["outputs"] if t["name"] != "sequence_snapshot"]
        self.output = query.get("output", outputs[0])
        if self.output not in outputs:
            raise ValueError(f"model {name!r} has no output {self.output!r}; it gives {outputs}")
        self.limit = backend.pending_limit(name)
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()  # (future of (text or bytes), rows), in arrival order
        self.pending_rows = 0
        self.room = asyncio.Event()
        self.room.set()
        self.closed = False

    # --- reading: one request per message ------------------------------------------------------------
    def submit_text(self, text: str) -> None:
        def parse() -> InferRequest:
            request = parse_infer_request(text.encode(), None)
            return self._in_session(request)
        self._submit(parse, binary=False)

    def submit_binary(self, data: bytes) -> None:
        spec = self.input
        rest = spec["shape"][1:]
        dtype = DTYPES.get(spec["datatype"])

        def parse() -> InferRequest:
            if dtype is None or spec["datatype"] == "BYTES" or any(d < 1 for d in rest):
                raise ProtocolError(f"input {spec['name']!r} ({spec['datatype']} {spec['shape']}) has no fixed row "
                                    "shape: send it as a JSON request (a text message)")
            row = math.prod(rest) * np.dtype(dtype).itemsize
            if not data or len(data) % row:
                raise ProtocolError(f"a binary message holds whole rows of input {spec['name']!r}: {row} bytes "
                                    f"each ({spec['datatype']} {rest}), got {len(data)} bytes")
            array = np.frombuffer(data, np.dtype(dtype).newbyteorder("<")).astype(dtype).reshape(-1, *rest)
            return self._in_session(InferRequest(None, {}, {spec["name"]: array}, {self.output: True}))
        self._submit(parse, binary=True)

    def _in_session(self, request: InferRequest) -> InferRequest:
        return in_session(request, self.sid, not self.started) if self.stateful else request

    def _submit(self, parse, binary: bool) -> None:
        future = self.loop.create_future()
        parsed: list[InferRequest] = []

        def parse_kept() -> InferRequest:
            parsed.append(parse())
            return parsed[0]

        start = time.perf_counter()

        def done(response, error) -> None:  # on the engine's thread
            if ACCESS.isEnabledFor(logging.INFO):
                status = 200 if error is None else getattr(error, "status", 500)
                rid = (parsed[0].id if parsed else None) or new_request_id()
                access_line(rid, self.name, "websocket", status, time.perf_counter() - start,
                            response.timing if response is not None else {})
            self.loop.call_soon_threadsafe(_settle, future, response, error)

        sub = self.backend.infer_then(self.name, parse_kept, self.version, done)
        rows = 1
        if sub is not None:
            self.started = True
            rows = max(1, sub.chunks)
        self.pending_rows += rows
        if self.pending_rows >= self.limit:
            self.room.clear()
        self.queue.put_nowait((future, rows, binary, parsed))

    def reply_error(self, message: str) -> None:
        future = self.loop.create_future()
        future.set_result((None, ServiceError(400, message)))
        self.queue.put_nowait((future, 0, False, []))

    # --- writing: the answers in order ---------------------------------------------------------------
    async def answer(self, websocket: WebSocket) -> None:
        while (item := await self.queue.get()) is not None:
            future, rows, binary, parsed = item
            response, error = await future
            self.pending_rows -= rows
            if self.pending_rows < self.limit:
                self.room.set()
            if self.closed:
                continue  # (the client went away: its answers are computed and dropped)
            try:
                if error is not None:
                    message = str(error) if isinstance(error, ServiceError) else \
                        f"internal error ({type(error).__name__})"
                    await websocket.send_text(json.dumps({"error": message}))
                elif binary:
                    await websocket.send_bytes(to_binary(response.outputs[self.output]))
                else:
                    content, headers = build_response(response, parsed[0])
                    if HEADER_LENGTH in headers:  # (it asked for binary outputs: the extension's body)
                        await websocket.send_bytes(content)
                    else:
                        await websocket.send_text(content.decode())
            except (WebSocketDisconnect, RuntimeError):  # closed under us
                self.closed = True

    def end(self) -> None:
        """The connection is over and its answers are in: its session ends."""
        if self.stateful and self.started:
            self.backend.end_session(self.name, self.sid, f"sequence {self.sid!r} ended when its WebSocket closed")


def _settle(future: asyncio.Future, response, error) -> None:
    if not future.done():
        future.set_result((response, error))
