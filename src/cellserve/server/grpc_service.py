"""The gRPC front end: the KServe v2 / Triton `inference.GRPCInferenceService` on grpcio's asyncio server,
over the same Backend as HTTP (backend.py), so `tritonclient.grpc` works unchanged. It only converts
protobuf messages to requests and responses back.

It reuses tritonclient's generated messages and servicer base (tritonclient.grpc.service_pb2*) instead of
generating its own: the `inference` protobuf package is then registered once per process, and a client
library in the same process (tritonclient, mlserver, kserve) cannot clash with a second definition.

Tensors travel as raw_input_contents / raw_output_contents (tritonclient reads only raw outputs); typed
`contents` are read too. ModelStreamInfer carries many requests and sessions on one stream: requests are
submitted in arrival order (so a session's chunks keep theirs), answered as they finish, and a bad request
gets an error_message in the stream while the stream goes on.
"""

from __future__ import annotations

import asyncio
import collections
import math

import grpc
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pbg

from cellserve.server.auth import GRPC_GROUPS, refusal
from cellserve.server.backend import ServiceError
from cellserve.server.telemetry import observed_infer
from cellserve.server.protocol import DTYPES, InferRequest, InferResponse, ProtocolError, datatype_of, from_binary, to_binary

CONTENTS = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
            "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def parameter_value(p: pb.InferParameter):
    choice = p.WhichOneof("parameter_choice")
    return None if choice is None else getattr(p, choice)


def set_parameter(p: pb.InferParameter, value) -> None:
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, (int, np.integer)):
        p.int64_param = int(value)
    elif isinstance(value, (float, np.floating)):
        p.double_param = float(value)
    else:
        p.string_param = str(value)


def decode_request(request: pb.ModelInferRequest) -> InferRequest:
    """A ModelInferRequest as the protocol-neutral InferRequest; ProtocolError names what is wrong."""
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise ProtocolError(f"{len(request.raw_input_contents)} raw_input_contents for {len(request.inputs)} inputs")
    if not request.inputs:
        raise ProtocolError("'inputs' must be a non-empty list of tensors")
    tensors = {}
    for i, tensor in enumerate(request.inputs):
        name, datatype, shape = tensor.name, tensor.datatype, list(tensor.shape)
        if not name:
            raise ProtocolError("input without a name")
        if name in tensors:
            raise ProtocolError(f"input {name!r} given twice")
        if datatype not in DTYPES:
            raise ProtocolError(f"input {name!r}: unknown datatype {datatype!r}; use one of {sorted(DTYPES)}")
        if any(d < 0 for d in shape):
            raise ProtocolError(f"input {name!r}: shape must be non-negative, got {shape}")
        count = math.prod(shape)  # (exact for any shape; np.prod wraps past int64 and costs 3 us a call)
        if request.raw_input_contents:
            array = from_binary(name, memoryview(request.raw_input_contents[i]), datatype, count)
        else:
            if datatype not in CONTENTS:
                raise ProtocolError(f"input {name!r}: {datatype} needs raw_input_contents")
            values = getattr(tensor.contents, CONTENTS[datatype])
            if len(values) != count:
                raise ProtocolError(f"input {name!r}: shape {shape} needs {count} elements, contents have {len(values)}")
            array = np.array(list(values), dtype=DTYPES[datatype]) if datatype != "BYTES" else np.array(list(values), object)
        tensors[name] = array.reshape(shape)
    parameters = {k: parameter_value(v) for k, v in request.parameters.items()}
    outputs = {o.name: True for o in request.outputs}
    return InferRequest(request.id or None, parameters, tensors, outputs, True)


def encode_response(response: InferResponse) -> pb.ModelInferResponse:
    message = pb.ModelInferResponse(model_name=response.model_name, model_version=response.model_version,
                                    id=response.id or "")
    for name, array in response.outputs.items():
        message.outputs.add(name=name, datatype=datatype_of(array), shape=list(array.shape))
        message.raw_output_contents.append(to_binary(array))
    for key, value in response.parameters.items():
        set_parameter(message.parameters[key], value)
    return message


def _metadata(context) -> dict:
    """The call's metadata (keys are lower case): x-request-id, and traceparent for traces."""
    return dict(context.invocation_metadata() or ())


class InferenceServicer(pbg.GRPCInferenceServiceServicer):
    def __init__(self, backend):
        self.backend = backend  # () -> the Backend (LocalBackend, or the Ray router)

    async def _guard(self, context, call):
        try:
            return await call()
        except ServiceError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.grpc_code), str(exc))

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=await self.backend().ready())

    async def ModelReady(self, request, context):
        return await self._guard(context, lambda: self._model_ready(request))

    async def _model_ready(self, request):
        return pb.ModelReadyResponse(ready=await self.backend().model_ready(request.name, request.version or None))

    async def ServerMetadata(self, request, context):
        meta = await self.backend().server_metadata()
        return pb.ServerMetadataResponse(name=meta["name"], version=meta["version"], extensions=meta["extensions"])

    async def ModelMetadata(self, request, context):
        return await self._guard(context, lambda: self._model_metadata(request))

    async def _model_metadata(self, request):
        meta = await self.backend().model_metadata(request.name, request.version or None)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["inputs"]],
            outputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["outputs"]])

    async def ModelConfig(self, request, context):
        return await self._guard(context, lambda: self._model_config(request))

    async def _model_config(self, request):
        config = await self.backend().model_config(request.name, request.version or None)
        return pb.ModelConfigResponse(config=json_format.ParseDict(config, mc.ModelConfig(), ignore_unknown_fields=True))

    async def ModelStatistics(self, request, context):
        return await self._guard(context, lambda: self._statistics(request))

    async def _statistics(self, request):
        stats = await self.backend().statistics(request.name or None, request.version or None)
        return json_format.ParseDict(stats, pb.ModelStatisticsResponse(), ignore_unknown_fields=True)

    async def RepositoryIndex(self, request, context):
        rows = await self.backend().repository_index(request.ready)
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**row) for row in rows])

    async def RepositoryModelLoad(self, request, context):
        return await self._guard(context, lambda: self._load(request.model_name))

    async def _load(self, name):
        await self.backend().load(name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        return await self._guard(context, lambda: self._unload(request.model_name))

    async def _unload(self, name):
        await self.backend().unload(name)
        return pb.RepositoryModelUnloadResponse()

    async def _infer(self, request, metadata: dict | None = None) -> pb.ModelInferResponse:
        metadata = metadata or {}
        message, _ = await observed_infer(self.backend(), request.model_name, lambda: decode_request(request),
                                          request.model_version or None, "grpc", encode_response,
                                          metadata.get("x-request-id"), metadata)
        return message

    async def ModelInfer(self, request, context):
        return await self._guard(context, lambda: self._infer(request, _metadata(context)))

    async def ModelStreamInfer(self, request_iterator, context):
        """Requests are submitted in arrival order (a session's chunks keep theirs) and answered as they
        finish. Flow control: while one session has more than its model's max_pending_chunks unanswered,
        the stream is not read further (the client's sends wait), so load never makes the server refuse a
        chunk of an open session, and memory stays bounded."""
        answers: asyncio.Queue = asyncio.Queue()
        pending: collections.Counter = collections.Counter()  # sequence id -> chunks unanswered
        drained = asyncio.Condition()

        traced = {k: v for k, v in _metadata(context).items() if k != "x-request-id"}  # each message has its id

        async def one(request, sid):
            try:
                answer = pb.ModelStreamInferResponse(infer_response=await self._infer(request, traced))
            except ServiceError as exc:
                answer = pb.ModelStreamInferResponse(error_message=str(exc), infer_response=_failed(request))
            except Exception as exc:  # never take the stream (or the server) down
                answer = pb.ModelStreamInferResponse(error_message=f"internal error: {exc}",
                                                     infer_response=_failed(request))
            await answers.put(answer)
            if sid is not None:
                async with drained:
                    pending[sid] -= 1
                    drained.notify_all()

        broken = []  # what ended the reading early (a message grpcio could not parse)

        async def read():
            tasks = []
            try:
                await read_all(tasks)
            except Exception as exc:  # noqa: BLE001 (the stream ends with a status that says why)
                broken.append(exc)
            await asyncio.gather(*tasks)
            await answers.put(None)

        async def read_all(tasks):
            async for request in request_iterator:
                sid = _sequence_id(request)
                if sid is not None:
                    pending[sid] += 1
                tasks.append(asyncio.ensure_future(one(request, sid)))
                await asyncio.sleep(0)  # it submits before the next is read: chunks keep their order
                if sid is not None:
                    limit = self.backend().pending_limit(request.model_name)
                    if pending[sid] > limit:
                        async with drained:
                            await drained.wait_for(lambda: pending[sid] <= limit)

        reader = asyncio.ensure_future(read())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
        finally:
            reader.cancel()
        if broken:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed stream message: {broken[0]}")


def _sequence_id(request: pb.ModelInferRequest):
    if "sequence_id" not in request.parameters:
        return None
    return parameter_value(request.parameters["sequence_id"])


def _failed(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    """What names a failed request in the stream (as Triton does): its model and id, no outputs."""
    return pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version, id=request.id)


class Restricted(grpc.aio.ServerInterceptor):
    """Restricted API groups on gRPC (auth.py): a call without the group's metadata key, or with a wrong
    value, ends UNAUTHENTICATED or PERMISSION_DENIED before it reaches the servicer."""

    def __init__(self, restrictions):
        self.restrictions = list(restrictions)

    async def intercept_service(self, continuation, details):
        metadata = {k.lower(): v for k, v in (details.invocation_metadata or ())}
        refused = refusal(self.restrictions, GRPC_GROUPS.get(details.method.rsplit("/", 1)[-1]), metadata)
        handler = await continuation(details)
        if refused is None or handler is None:
            return handler
        code = grpc.StatusCode.UNAUTHENTICATED if refused[0] == 401 else grpc.StatusCode.PERMISSION_DENIED

        async def deny(request, context):
            await context.abort(code, refused[1])

        kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler,
                 (False, True): grpc.unary_stream_rpc_method_handler, (True, False): grpc.stream_unary_rpc_method_handler}
        return kinds[(handler.request_streaming, handler.response_streaming)](
            deny, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


def tls_pem(tls: dict) -> dict:
    """The PEM bytes of {"certfile", "keyfile"[, "ca_certfile"]}: {"key", "cert", "ca" (None without one)}."""
    def read(option):
        if not tls.get(option):
            return None
        with open(tls[option], "rb") as f:
            return f.read()

    return {"key": read("keyfile"), "cert": read("certfile"), "ca": read("ca_certfile")}


async def start_grpc(backend, host: str, port: int, max_message_bytes: int = 64 * 2**20, restricted=(),
                     tls: dict | None = None):
    """Start the gRPC service on the running event loop; returns (server, bound port). tls: {"certfile",
    "keyfile"[, "ca_certfile": client certificates required]}."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_message_bytes),
                                      ("grpc.max_send_message_length", max_message_bytes)],
                             interceptors=[Restricted(restricted)] if restricted else None)
    pbg.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(backend), server)
    address = f"{host}:{port}"
    if tls:
        pem = tls_pem(tls)
        credentials = grpc.ssl_server_credentials([(pem["key"], pem["cert"])], root_certificates=pem["ca"],
                                                  require_client_auth=pem["ca"] is not None)
        bound = server.add_secure_port(address, credentials)
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot listen for gRPC on {address}")
    await server.start()
    return server, bound
