"""Code written against the documented callout API runs unmodified on calloutkit."""

from __future__ import annotations

import argparse
import asyncio
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from types import SimpleNamespace

import calloutkit_native
import grpc
import pytest
from conftest import LOOPBACK, Certs, free_port, read_until, spawn, stop_process
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    HttpBody,
    HttpHeaders,
    ProcessingRequest,
    ProcessingResponse,
)
from envoy.service.ext_proc.v3.external_processor_pb2_grpc import ExternalProcessorStub

from calloutkit.testing import Envoy, envoy_config, http_request
from extproc.service.callout_server import CalloutServer as DocumentedCalloutServer
from extproc.service.callout_server import _addr_to_str
from extproc.service.callout_tools import add_body_mutation, add_header_mutation, headers_contain

# The developer guide's complete example, verbatim.
GUIDE_EXAMPLE = textwrap.dedent("""\
    import logging
    from grpc import ServicerContext
    from envoy.service.ext_proc.v3.external_processor_pb2 import HeadersResponse
    from envoy.service.ext_proc.v3.external_processor_pb2 import HttpHeaders
    from extproc.service.callout_server import CalloutServer
    from extproc.service.callout_tools import add_header_mutation

    class BasicCalloutServer(CalloutServer):
        def on_response_headers(self, headers: HttpHeaders, context: ServicerContext) -> HeadersResponse:
            return add_header_mutation(add=[('foo', 'bar')])

    if __name__ == '__main__':
        logging.basicConfig(level=logging.INFO)
        BasicCalloutServer().run()
    """)  # noqa: E501

# The documented pattern for examples that take command-line flags.
FLAGS_EXAMPLE = textwrap.dedent("""\
    import logging
    from extproc.service import callout_tools
    from extproc.service.callout_server import CalloutServer
    from extproc.service.command_line_tools import add_command_line_args

    class Example(CalloutServer):
        def on_request_headers(self, headers, context):
            return callout_tools.add_header_mutation(add=[('x-flags', 'yes')])

    if __name__ == '__main__':
        args = add_command_line_args().parse_args()
        logging.basicConfig(level=logging.INFO)
        Example(**vars(args)).run()
    """)


@pytest.mark.envoy
async def test_guide_example_runs_unmodified_behind_envoy(tmp_path, upstream):
    (tmp_path / "server.py").write_text(GUIDE_EXAMPLE)
    grpc_port, health_port = free_port(), free_port()
    process = spawn([sys.executable, "-m", "server"], cwd=str(tmp_path), env={
        "CALLOUTKIT_PLAINTEXT_ADDRESS": f"127.0.0.1:{grpc_port}",
        "CALLOUTKIT_HEALTH_CHECK_ADDRESS": f"127.0.0.1:{health_port}"})
    try:
        await asyncio.to_thread(read_until, process, "serving:")
        with Envoy(envoy_config(grpc_port, upstream.port)) as envoy:
            response = await asyncio.to_thread(http_request, envoy.url + "/")
        assert response.status == 200
        assert response.header("foo") == "bar"
    finally:
        stop_process(process)


def test_documented_flags_example_runs(tmp_path):
    (tmp_path / "flags_example.py").write_text(FLAGS_EXAMPLE)
    port = free_port()
    process = spawn([sys.executable, "flags_example.py", "--plaintext_address",
                     f"127.0.0.1:{port}", "--combined_health_check"], cwd=str(tmp_path))
    try:
        line = read_until(process, "serving:")
        assert f"grpc 127.0.0.1:{port}" in line
    finally:
        stop_process(process)


@pytest.mark.no_server
def test_documented_imports():
    from envoy.service.ext_proc.v3.external_processor_pb2 import HeadersResponse, HttpHeaders

    import calloutkit
    from extproc.service import callout_server, callout_tools, command_line_tools

    assert callout_server.CalloutServer is calloutkit.CalloutServer
    for name in ("add_header_mutation", "add_body_mutation", "header_immediate_response",
                 "deny_callout", "headers_contain", "body_contains",
                 "build_dynamic_forwarding_metadata"):
        assert callable(getattr(callout_tools, name))
    assert callable(command_line_tools.add_command_line_args)
    assert HeadersResponse and HttpHeaders


# -- tests written the way the documented library"s own tests drive a server ------------------
# A server runs `run()` in a thread; the test polls `_setup`, connects with synchronous gRPC to
# `_addr_to_str(server.<listener>_address)`, and stops it with `shutdown()`. Ports are free
# ports, not the documented defaults.

class Basic(DocumentedCalloutServer):  # the documented basic example, as written there
    def on_request_headers(self, headers, _):
        return add_header_mutation(
            add=[(":authority", "service-extensions.com"), (":path", "/"),
                 ("Header-Request", "request")],
            remove=["Foo"], clear_route_cache=True)

    def on_response_headers(self, headers, _):
        return add_header_mutation(add=[("hello", "service-extensions")])

    def on_request_body(self, body, _):
        return add_body_mutation(body="replaced-body")

    def on_response_body(self, body, _):
        return add_body_mutation(clear_body=True)


def _start(server: DocumentedCalloutServer) -> threading.Thread:
    assert server._setup is False
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server._setup and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server._setup
    return thread


def _stop(server: DocumentedCalloutServer, thread: threading.Thread) -> None:
    server.shutdown()
    thread.join(timeout=10)
    assert not thread.is_alive()


def make_request(stub: ExternalProcessorStub, **kwargs) -> ProcessingResponse:
    for response in stub.Process(iter([ProcessingRequest(**kwargs)]), timeout=10):
        return response
    raise AssertionError("no response")


@pytest.fixture
def documented(certs: Certs) -> Iterator[DocumentedCalloutServer]:
    server = Basic(secure_address=("127.0.0.1", free_port()),
                   plaintext_address=("127.0.0.1", free_port()),
                   health_check_address=("127.0.0.1", free_port()),
                   cert_chain_path=certs.cert_path, private_key_path=certs.key_path)
    thread = _start(server)
    yield server
    _stop(server, thread)


def test_documented_attributes_and_helpers(documented: DocumentedCalloutServer) -> None:
    server = documented
    if server.config.transport == "grpcio":
        assert isinstance(server._callout_server, grpc.aio.Server)
    else:
        assert isinstance(server._callout_server, calloutkit_native.Server)
    assert server._health_check_server is not None
    assert server.address == server.secure_address == ("127.0.0.1", server.secure_port)
    assert server.plaintext_address == ("127.0.0.1", server.plaintext_port)
    assert server.health_check_address == ("127.0.0.1", server.health_check_port)
    assert _addr_to_str(server.plaintext_address) == f"127.0.0.1:{server.plaintext_port}"


def test_documented_basic_test_runs_over_tls(documented: DocumentedCalloutServer,
                                            certs: Certs) -> None:
    creds = grpc.ssl_channel_credentials(certs.ca_pem)
    with grpc.secure_channel(_addr_to_str(documented.secure_address), creds,
                             options=[("grpc.ssl_target_name_override", "localhost")]) as channel:
        stub = ExternalProcessorStub(channel)
        body, headers = HttpBody(end_of_stream=False), HttpHeaders(end_of_stream=False)
        value = make_request(stub, request_body=body)
        assert value.request_body == add_body_mutation(body="replaced-body")
        value = make_request(stub, response_body=body)
        assert value.response_body == add_body_mutation(clear_body=True)
        value = make_request(stub, response_headers=headers)
        assert value.response_headers == add_header_mutation(
            add=[("hello", "service-extensions")])
        value = make_request(stub, request_headers=headers)
        # keys kept as given, so the documented comparison holds
        assert value.request_headers == add_header_mutation(
            add=[(":authority", "service-extensions.com"), (":path", "/"),
                 ("Header-Request", "request")],
            remove=["Foo"], clear_route_cache=True)
        # no phase set: an empty reply, not silence
        assert make_request(stub) == ProcessingResponse()
        # observability mode: the reply comes as usual (Envoy ignores it)
        value = make_request(stub, response_headers=headers, observability_mode=True)
        assert value.response_headers == add_header_mutation(
            add=[("hello", "service-extensions")])


def test_documented_health_check_is_an_empty_200(documented: DocumentedCalloutServer) -> None:
    url = f"http://{_addr_to_str(documented.health_check_address)}"
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.getcode() == 200
        assert not response.read()


def test_documented_plaintext_channel_and_no_health_server() -> None:
    server = Basic(plaintext_address=("127.0.0.1", free_port()), disable_tls=True,
                   combined_health_check=True)
    assert (server.secure_address, server.health_check_address) == (None, None)
    thread = _start(server)
    try:
        assert server._health_check_server is None
        with grpc.insecure_channel(_addr_to_str(server.plaintext_address)) as channel:
            value = make_request(ExternalProcessorStub(channel),
                                 response_headers=HttpHeaders(end_of_stream=True))
        assert value.response_headers == add_header_mutation(
            add=[("hello", "service-extensions")])
    finally:
        _stop(server, thread)
    assert server._setup  # as documented: it stays set once the server has run


def test_port_0_keeps_the_configured_tuple_and_the_bound_port_is_in_port_attributes() -> None:
    server = Basic(**LOOPBACK)
    thread = _start(server)
    try:
        assert server.plaintext_address == ("127.0.0.1", 0)
        assert server.plaintext_port not in (None, 0)
    finally:
        _stop(server, thread)


@pytest.mark.no_server
def test_documented_address_argparse_type() -> None:
    from extproc.service.command_line_tools import _addr, add_command_line_args

    assert _addr("127.0.0.1:9000") == ("127.0.0.1", 9000)
    assert _addr("") is None
    with pytest.raises(argparse.ArgumentTypeError, match="no port"):
        _addr("localhost")
    args = add_command_line_args().parse_args(["--plaintext_address", "127.0.0.1:9001"])
    assert args.plaintext_address == ("127.0.0.1", 9001)


def test_a_def_process_override_with_context_state_runs_as_written() -> None:
    """The shape of the documented gateway example: state set on the context, and a plain
    def process() that edits the message super().process() returns."""

    def state(context):
        found = getattr(context, "_gateway_state", None)
        if found is None:
            found = context._gateway_state = SimpleNamespace(streaming=False)
        return found

    class Gateway(DocumentedCalloutServer):
        def process(self, callout, context):
            resp = super().process(callout, context)
            if resp.HasField("immediate_response"):
                return resp
            if callout.HasField("response_headers"):
                mode = ProcessingMode()
                mode.response_body_mode = (ProcessingMode.STREAMED if state(context).streaming
                                           else ProcessingMode.BUFFERED)
                resp.mode_override.CopyFrom(mode)
            return resp

        def on_request_headers(self, headers, context):
            state(context).streaming = headers_contain(headers, "accept", "text/event-stream")
            return add_header_mutation(add=[("X-Routed", "true")])

    server = Gateway(**LOOPBACK)
    thread = _start(server)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.plaintext_port}") as channel:
            stub = ExternalProcessorStub(channel)
            accept = HttpHeaders()
            option = accept.headers.headers.add()
            option.key, option.raw_value = "accept", b"text/event-stream"
            replies = list(stub.Process(iter([
                ProcessingRequest(request_headers=accept),
                ProcessingRequest(response_headers=HttpHeaders())]), timeout=10))
    finally:
        _stop(server, thread)
    assert replies[0].request_headers == add_header_mutation(add=[("X-Routed", "true")])
    assert replies[1].mode_override.response_body_mode == ProcessingMode.STREAMED
