"""The floor: bare, hand-written grpc.aio servicers doing exactly the benchmark's work.

No calloutkit import. This is what a careful user would write against grpcio alone, and the
cost calloutkit is held to. Each servicer builds its reply per message, as the calloutkit
callbacks in `callouts.py` do; nothing is cached across requests.

Work:

- ``headers``: ext_proc; set ``x-callout-request: 1`` on the request headers and
  ``x-callout-response: 1`` on the response headers.
- ``body``: ext_proc; replace a BUFFERED response body with its upper-cased copy (same
  length, so content-length stays right).
- ``tyk``: coprocess Dispatch; a Pre hook adds one header to the request and echoes the Object.

The ext_proc servicers come in the two grpc.aio styles: an async generator over the request
iterator (``iterator``) and explicit ``context.read()`` / ``context.write()`` (``readwrite``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

EXT_PROC = "envoy.service.ext_proc.v3.ExternalProcessor"
DISPATCHER = "coprocess.Dispatcher"


def _headers_reply(request: pb.ProcessingRequest) -> pb.ProcessingResponse:
    response = pb.ProcessingResponse()
    phase = request.WhichOneof("request")
    if phase == "request_headers":
        response.request_headers.response.header_mutation.set_headers.append(
            base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(
                key="x-callout-request", raw_value=b"1")))
    elif phase == "response_headers":
        response.response_headers.response.header_mutation.set_headers.append(
            base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(
                key="x-callout-response", raw_value=b"1")))
    else:  # not sent by the benchmark's Envoy configuration; answer it anyway
        getattr(response, str(phase)).SetInParent()
    return response


def _body_reply(request: pb.ProcessingRequest) -> pb.ProcessingResponse:
    response = pb.ProcessingResponse()
    phase = request.WhichOneof("request")
    if phase == "response_body":
        response.response_body.response.body_mutation.body = request.response_body.body.upper()
    else:
        getattr(response, str(phase)).SetInParent()
    return response


REPLIES = {"headers": _headers_reply, "body": _body_reply}


def ext_proc_handler(work: str, style: str) -> grpc.GenericRpcHandler:
    """The ext_proc ``Process`` handler for ``work`` in grpc.aio ``style``."""
    reply = REPLIES[work]

    async def iterator(requests: AsyncIterator[pb.ProcessingRequest],
                       context: Any) -> AsyncIterator[pb.ProcessingResponse]:
        async for request in requests:
            yield reply(request)

    async def readwrite(requests: Any, context: Any) -> None:
        while (request := await context.read()) is not grpc.aio.EOF:
            await context.write(reply(request))

    stream = {"iterator": iterator, "readwrite": readwrite}[style]
    return grpc.method_handlers_generic_handler(EXT_PROC, {
        "Process": grpc.stream_stream_rpc_method_handler(
            stream, request_deserializer=pb.ProcessingRequest.FromString,
            response_serializer=pb.ProcessingResponse.SerializeToString)})


def tyk_handler() -> grpc.GenericRpcHandler:
    """A coprocess Dispatcher whose Pre hook adds ``X-Plugin: floor`` and echoes the Object."""
    # Only the protoc-generated message class comes from calloutkit's tree.
    from calloutkit._generated.coprocess.coprocess_object_pb2 import Object

    async def dispatch(request: Any, context: Any) -> Any:
        request.request.set_headers["X-Plugin"] = "floor"
        return request

    return grpc.method_handlers_generic_handler(DISPATCHER, {
        "Dispatch": grpc.unary_unary_rpc_method_handler(
            dispatch, request_deserializer=Object.FromString,
            response_serializer=Object.SerializeToString)})
