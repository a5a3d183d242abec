"""Code written against the documented callout API runs unmodified on calloutkit."""

from __future__ import annotations

import asyncio
import sys
import textwrap

import pytest
from conftest import free_port, read_until, spawn, stop_process

from calloutkit.testing import Envoy, envoy_config, http_request

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
