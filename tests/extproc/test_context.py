"""CalloutContext's readable accessors, driven in process with CalloutClient: headers as
`Headers` on every phase, Envoy's attributes and forwarded metadata as plain Python."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import LOOPBACK
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import any_pb2, wrappers_pb2

from calloutkit import CalloutContext, CalloutServer, Headers
from calloutkit.testing import CalloutClient

# No test here starts a server: each runs once, not per transport.
pytestmark = pytest.mark.no_server

EXT_PROC = "envoy.filters.http.ext_proc"


class Recorder(CalloutServer):
    """Records, on every phase, what the context's accessors read."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.seen: dict[str, dict[str, Any]] = {}

    def _record(self, phase: str, context: CalloutContext) -> None:
        self.seen[phase] = {
            "request": dict(context.request_headers_map),
            "response": dict(context.response_headers_map),
            "request_trailers": dict(context.request_trailers_map),
            "response_trailers": dict(context.response_trailers_map),
            "attributes": dict(context.attributes),
            "metadata": context.metadata,
            "typed": context.typed_metadata,
        }

    def on_request_headers(self, headers, context):
        self._record("request_headers", context)

    def on_request_body(self, body, context):
        self._record("request_body", context)

    def on_request_trailers(self, trailers, context):
        self._record("request_trailers", context)

    def on_response_headers(self, headers, context):
        self._record("response_headers", context)

    def on_response_body(self, body, context):
        self._record("response_body", context)

    def on_response_trailers(self, trailers, context):
        self._record("response_trailers", context)


def test_headers_are_case_insensitive_and_join_repeated_names() -> None:
    message = pb.HttpHeaders()
    for key, value in [(":path", "/a?b=1"), ("set-cookie", "a=1"), ("Content-Type", "text/x"),
                       ("set-cookie", "b=2"), ("x-bin", "")]:
        header = message.headers.headers.add()
        header.key, header.raw_value = key, value.encode()
    message.headers.headers.add(key="x-value-only", value="old-style")
    message.headers.headers.add(key="x-bad", raw_value=b"\xff!")
    headers = Headers(message)
    assert headers["CONTENT-TYPE"] == "text/x"
    assert "Content-Type" in headers and "x-missing" not in headers and 3 not in headers
    assert headers["set-cookie"] == "a=1, b=2"
    assert headers.get_all("Set-Cookie") == ["a=1", "b=2"]
    assert headers.get_all("x-missing") == []
    assert headers["x-value-only"] == "old-style"
    assert headers["x-bin"] == ""
    assert headers["x-bad"] == "\ufffd!"
    assert list(headers) == [":path", "set-cookie", "content-type", "x-bin", "x-value-only",
                             "x-bad"]
    assert len(headers) == 6
    assert headers.get("x-missing", "d") == "d"
    with pytest.raises(KeyError):
        headers["x-missing"]
    with pytest.raises(TypeError):
        headers["x"] = "y"  # type: ignore[index]
    assert dict(Headers(pb.HttpTrailers(trailers=message.headers))) == dict(headers)
    assert dict(Headers(message.headers)) == dict(headers)
    assert Headers() == {}


async def test_every_phase_reads_what_the_stream_has_seen() -> None:
    server = Recorder(**LOOPBACK)
    client = CalloutClient(server, request_body_mode="BUFFERED", response_body_mode="BUFFERED")
    async with client.stream() as stream:
        await stream.request_headers(
            {":path": "/a", "X-User": "ann"},
            attributes={EXT_PROC: {"request.path": "/a", "destination.port": 8080,
                                   "connection.mtls": False}},
            metadata={"my.ns": {"tenant": "acme", "tier": 3, "tags": ["a", 1, None],
                                "nested": {"x": 1.5}}})
        await stream.request_body(b"body")
        await stream.request_trailers({"x-checksum": "abc"})
        await stream.response_headers({":status": "200"},
                                      attributes={EXT_PROC: {"response.code": 200}},
                                      metadata={"my.ns": {"tenant": "acme", "phase": "resp"}})
        await stream.response_body(b"out")
        await stream.response_trailers({"grpc-status": "0"})
    seen = server.seen
    request = {":path": "/a", "x-user": "ann"}
    assert seen["request_headers"]["request"] == request
    assert seen["request_headers"]["response"] == {}
    # body and trailer phases read the headers the stream saw earlier
    assert seen["request_body"]["request"] == request
    assert seen["request_body"]["request_trailers"] == {}
    assert seen["request_trailers"]["request_trailers"] == {"x-checksum": "abc"}
    assert seen["response_body"]["response"] == {":status": "200"}
    assert seen["response_body"]["request"] == request
    assert seen["response_trailers"]["response_trailers"] == {"grpc-status": "0"}
    assert seen["response_trailers"]["request_trailers"] == {"x-checksum": "abc"}

    request_attributes = {"request.path": "/a", "destination.port": 8080.0,
                          "connection.mtls": False}
    assert seen["request_headers"]["attributes"] == request_attributes
    assert seen["request_body"]["attributes"] == request_attributes
    # merged: the response phases see the request's attributes and their own
    assert seen["response_headers"]["attributes"] == {**request_attributes,
                                                      "response.code": 200.0}
    assert seen["response_trailers"]["attributes"] == {**request_attributes,
                                                       "response.code": 200.0}
    assert isinstance(seen["request_headers"]["attributes"]["destination.port"], float)

    assert seen["request_headers"]["metadata"] == {"my.ns": {
        "tenant": "acme", "tier": 3.0, "tags": ["a", 1.0, None], "nested": {"x": 1.5}}}
    # metadata is read from the message being handled: the later message's wins
    assert seen["response_headers"]["metadata"] == {"my.ns": {"tenant": "acme",
                                                              "phase": "resp"}}
    assert seen["response_body"]["metadata"] == {}
    assert seen["request_headers"]["typed"] == {}


async def test_typed_metadata_comes_as_any() -> None:
    server = Recorder(**LOOPBACK)
    async with CalloutClient(server).stream() as stream:
        request = pb.ProcessingRequest()
        request.request_headers.headers.headers.add(key=":path", raw_value=b"/")
        packed = any_pb2.Any()
        packed.Pack(wrappers_pb2.StringValue(value="hello"))
        request.metadata_context.typed_filter_metadata["typed.ns"].CopyFrom(packed)
        await stream.send(request)
    typed = server.seen["request_headers"]["typed"]
    value = wrappers_pb2.StringValue()
    assert typed["typed.ns"].Unpack(value) and value.value == "hello"


async def test_accessors_are_made_once_per_message_and_only_when_read() -> None:
    made: list[int] = []

    class Reader(CalloutServer):
        def on_request_headers(self, headers, context):
            made.append(len(vars(context)))  # nothing read yet: no cached view
            first = context.request_headers_map
            assert context.request_headers_map is first
            assert context.attributes is context.attributes
            assert context.metadata is context.metadata
            context.state.first = first

        def on_response_headers(self, headers, context):
            # a new message: the request's view is still the same, the response's is new
            assert context.request_headers_map is context.state.first
            assert context.response_headers_map["x-b"] == "2"

    async with CalloutClient(Reader(**LOOPBACK)).stream() as stream:
        replies = [await stream.request_headers({"x-a": "1"}),
                   await stream.response_headers({"x-b": "2"})]
    # a failed assertion in a callback would have been answered by the error policy
    assert [r.WhichOneof("response") for r in replies if r is not None] == [
        "request_headers", "response_headers"]
    assert made == [0]


def test_a_context_outside_a_stream_reads_empty() -> None:
    context = CalloutContext(None)
    assert context.request_headers_map == {}
    assert context.response_trailers_map == {}
    assert context.attributes == {}
    assert context.metadata == {}
    assert context.typed_metadata == {}


async def test_a_def_process_override_sees_the_same_accessors() -> None:
    class Raw(Recorder):
        def process(self, callout, context):
            return super().process(callout, context)

    server = Raw(**LOOPBACK)
    async with CalloutClient(server).stream() as stream:
        await stream.request_headers({"X-A": "1"}, attributes={EXT_PROC: {"request.id": "r"}})
        await stream.request_trailers({"x-t": "2"})
        await stream.response_headers({":status": "204"})
    assert server.seen["response_headers"]["request"] == {"x-a": "1"}
    assert server.seen["response_headers"]["request_trailers"] == {"x-t": "2"}
    assert server.seen["response_headers"]["attributes"] == {"request.id": "r"}
