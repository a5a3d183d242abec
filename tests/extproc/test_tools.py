"""calloutkit.tools: the documented helpers build what Envoy reads."""

from __future__ import annotations

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from calloutkit import CalloutContext, tools
from calloutkit.runtime._errors import StreamAbort
from calloutkit.testing import (
    header_changes,
    header_removals,
    http_body,
    http_headers,
    http_trailers,
)

# No test here starts a server: each runs once, not per transport.
pytestmark = pytest.mark.no_server

HEADERS = http_headers({"Content-Type": "application/json", "X-Token": "abc", ":path": "/p"})


def test_add_header_mutation_writes_raw_value_only_and_keeps_keys_as_given():
    reply = tools.add_header_mutation(add=[("X-A", "1"), ("x-b", "2")], remove=["X-C"],
                                      clear_route_cache=True,
                                      append_action=base_pb2.HeaderValueOption.ADD_IF_ABSENT)
    options = reply.response.header_mutation.set_headers
    assert [(o.header.key, o.header.raw_value, o.header.value) for o in options] == [
        ("X-A", b"1", ""), ("x-b", b"2", "")]
    assert all(o.append_action == base_pb2.HeaderValueOption.ADD_IF_ABSENT for o in options)
    assert list(reply.response.header_mutation.remove_headers) == ["X-C"]
    assert reply.response.clear_route_cache
    # the test client reads them as Envoy does, lower-cased
    response = pb.ProcessingResponse(request_headers=reply)
    assert header_changes(response) == {"x-a": "1", "x-b": "2"}
    assert header_removals(response) == ["x-c"]


def test_calloutkit_own_mutation_helpers_still_lower_case():
    mutation = tools.header_mutation(add=[("X-A", "1")], remove=["X-C"])
    assert (mutation.set_headers[0].header.key, list(mutation.remove_headers)) == ("x-a", ["x-c"])
    trailers = tools.add_trailer_mutation(add=[("X-Sum", "1")])
    assert trailers.header_mutation.set_headers[0].header.key == "x-sum"


@pytest.mark.parametrize("body", ["text", b"\xff\x00bytes"])
def test_add_body_mutation_accepts_str_and_bytes(body):
    reply = tools.add_body_mutation(body=body)
    assert reply.response.body_mutation.body == (body.encode() if isinstance(body, str)
                                                 else body)
    assert tools.add_body_mutation(clear_body=True).response.body_mutation.clear_body


@pytest.mark.parametrize("body", ["", b"", None])
def test_an_empty_body_leaves_the_body_alone_unless_clear_body(body):
    # documented: body and clear_body left at their defaults do not modify the body
    assert not tools.add_body_mutation(body=body).response.HasField("body_mutation")
    cleared = tools.add_body_mutation(body=body, clear_body=True).response.body_mutation
    assert cleared.WhichOneof("mutation") == "clear_body" and cleared.clear_body


def test_header_immediate_response():
    reply = tools.header_immediate_response(302, headers=[("Location", "/x")], body="moved",
                                            details="redirected")
    assert reply.status.code == 302
    assert reply.headers.set_headers[0].header.key == "Location"  # as given
    assert reply.headers.set_headers[0].header.raw_value == b"/x"
    assert (reply.body, reply.details) == (b"moved", "redirected")


def test_header_lookups_are_case_insensitive_and_read_raw_value():
    assert tools.headers_contain(HEADERS, "x-token")
    assert tools.headers_contain(HEADERS, "X-TOKEN", "abc")
    assert not tools.headers_contain(HEADERS, "x-token", "zzz")
    assert tools.get_header(HEADERS, "content-type") == "application/json"
    assert tools.get_header(HEADERS, "missing", "dflt") == "dflt"
    assert tools.header_dict(http_trailers({"A": "1"})) == {"a": "1"}


def test_body_contains_is_safe_on_binary_bodies():
    body = http_body(b"\x89PNG\r\n\x1a\n\xff\xfe needle")
    assert tools.body_contains(body, "needle")
    assert tools.body_contains(body, b"\xff\xfe")
    assert not tools.body_contains(body, "haystack")


def test_dynamic_forwarding_metadata():
    metadata = tools.build_dynamic_forwarding_metadata("10.1.2.3", 8080)
    namespace = "com.google.envoy.dynamic_forwarding.selected_endpoints"
    assert metadata[namespace]["primary"] == "10.1.2.3:8080"


def test_deny_callout_ends_the_stream_with_permission_denied():
    context = CalloutContext(None)
    with pytest.raises(StreamAbort) as abort:
        tools.deny_callout(context, "nope")
    assert (abort.value.code, abort.value.details) == (grpc.StatusCode.PERMISSION_DENIED, "nope")


def test_override_mode_keeps_unnamed_body_modes():
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    context = CalloutContext(None)
    context.request = pb.ProcessingRequest(request_headers=HEADERS)
    context.response_body_mode = 2  # BUFFERED, as configured
    reply = tools.override_mode(context, tools.add_header_mutation(add=[("a", "b")]),
                                request_body_mode="STREAMED")
    assert reply.request_headers.response.header_mutation.set_headers[0].header.key == "a"
    assert (reply.mode_override.request_body_mode, reply.mode_override.response_body_mode) == (
        1, 2)
    reply = tools.add_dynamic_metadata(context, reply, {"ns": {"user": "u1"}})
    assert reply.dynamic_metadata["ns"]["user"] == "u1"
