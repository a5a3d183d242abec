"""``calloutkit demo``: a real Envoy in front of a callout server and a local upstream.

It sends one request through Envoy, shows what the callout changed in both directions, and
keeps serving until Ctrl-C so you can try it with curl.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import time
from typing import Any

from ..extproc._server import CalloutServer
from ..extproc._tools import add_header_mutation, get_header
from ..testing._envoy import Envoy, envoy_config
from ..testing._http1 import http_request
from ..testing._upstream import UpstreamServer


class DemoServer(CalloutServer):
    """Adds a header to every request (seen by the upstream) and to every response."""

    def new_state(self) -> Any:
        return {"started": time.monotonic()}

    async def on_request_headers(self, headers: Any, context: Any) -> Any:
        path = get_header(headers, ":path", "/")
        return add_header_mutation(add=[("x-calloutkit-request", f"seen {path}")])

    async def on_response_headers(self, headers: Any, context: Any) -> Any:
        elapsed_ms = (time.monotonic() - context.state["started"]) * 1000
        return add_header_mutation(add=[("x-calloutkit-response", "added"),
                                        ("x-calloutkit-elapsed-ms", f"{elapsed_ms:.2f}")])


def _free_or(port: int) -> int:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return 0
    return port


async def run_demo(port: int, once: bool) -> int:
    # SIGTERM would end the process on the spot and leave Envoy, in its own session, running:
    # it stops the demo the way Ctrl-C does instead.
    main = asyncio.current_task()
    assert main is not None
    with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows loops
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    server = DemoServer(plaintext_address=("127.0.0.1", 0), disable_tls=True,
                        combined_health_check=True)
    await server.start()
    upstream = UpstreamServer().start()
    envoy = Envoy(envoy_config(server.plaintext_port or 0, upstream.port,
                               listener_port=_free_or(port), access_log=False))
    try:
        await asyncio.to_thread(envoy.start)
        url = f"{envoy.url}/hello?from=calloutkit"
        response = await asyncio.to_thread(http_request, url, "GET",
                                           [("user-agent", "calloutkit-demo")])
        seen = upstream.requests[-1]["headers"]
        print(f"\nGET {url} -> {response.status}")
        print("  request header added by the callout, as the upstream saw it:")
        print(f"    x-calloutkit-request: {seen.get('x-calloutkit-request')}")
        print("  response headers added by the callout, as the client saw them:")
        for name in ("x-calloutkit-response", "x-calloutkit-elapsed-ms"):
            print(f"    {name}: {response.header(name)}")
        if once:
            return 0 if response.status == 200 and seen.get("x-calloutkit-request") else 1
        print(f"\nEnvoy is listening: try  curl -i {envoy.url}/anything")
        print("Press Ctrl-C to stop.")
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
        return 0
    finally:
        await asyncio.to_thread(envoy.stop)
        upstream.stop()
        await server.stop(grace=1)


def _run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(run_demo(args.port, args.once))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\nstopped")
        return 0


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo", help="run Envoy + a callout server + an upstream",
        description="Run a real Envoy in front of a callout server and a local upstream, send "
                    "one request through it, show what the callout changed in both directions, "
                    "and keep serving until Ctrl-C so you can try it with curl.")
    parser.add_argument("--port", type=int, default=10000,
                        help="Envoy listener port (a free one is used if it is taken)")
    parser.add_argument("--once", action="store_true",
                        help="send the request, print the result and exit")
    parser.set_defaults(func=_run)
