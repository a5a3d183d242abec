"""The servers under test, each started as its own process by `run.py`.

    python bench/servers.py IMPL WORK PORT [--workers N] [--loop asyncio|uvloop]

IMPL is ``floor`` or ``floor-readwrite`` (the bare grpc.aio servicers of `floor.py`),
``async`` (``async def`` callbacks), ``inline`` (``def`` callbacks marked `nonblocking`) or
``sync`` (plain ``def`` callbacks, run in the thread pool). WORK is ``headers``, ``body``,
``tyk``, ``heavy`` or ``heavier`` (a CPU-bound callback of about 1 or 3 ms: calloutkit only);
the calloutkit callbacks below do what `floor.py` does, written the documented way.
``--loop`` picks the event loop for either side, so that loops can be compared like for like;
``--transport`` picks calloutkit's gRPC transport (``grpcio`` or ``native``; left out, the
``CALLOUTKIT_TRANSPORT`` variable, else ``grpcio``: the sections that name no transport are
the grpc.aio comparisons of docs/performance.md, kept comparable from run to run).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from typing import Any

import floor
import grpc

from calloutkit import CalloutServer, add_body_mutation, add_header_mutation, nonblocking
from calloutkit.tyk import Hook, Plugin, PluginCall, TykPluginServer

# -- ext_proc: header mutation on both directions ----------------------------------------------


class AsyncHeaders(CalloutServer):
    async def on_request_headers(self, headers: Any, context: Any) -> Any:
        return add_header_mutation(add=[("x-callout-request", "1")])

    async def on_response_headers(self, headers: Any, context: Any) -> Any:
        return add_header_mutation(add=[("x-callout-response", "1")])


class SyncHeaders(CalloutServer):
    def on_request_headers(self, headers: Any, context: Any) -> Any:
        return add_header_mutation(add=[("x-callout-request", "1")])

    def on_response_headers(self, headers: Any, context: Any) -> Any:
        return add_header_mutation(add=[("x-callout-response", "1")])


class InlineHeaders(CalloutServer):
    @nonblocking
    def on_request_headers(self, headers: Any, context: Any) -> Any:
        return add_header_mutation(add=[("x-callout-request", "1")])

    @nonblocking
    def on_response_headers(self, headers: Any, context: Any) -> Any:
        return add_header_mutation(add=[("x-callout-response", "1")])


def heavy_work(milliseconds: int = 1) -> int:
    """About ``milliseconds`` of pure-Python work."""
    return sum(i * i for i in range(15_000 * milliseconds)) % 997


class AsyncHeavy(CalloutServer):
    """Header mutation after `heavy_work` (a CPU-bound callout)."""

    milliseconds = 1

    async def on_request_headers(self, headers: Any, context: Any) -> Any:
        checksum = heavy_work(self.milliseconds)
        return add_header_mutation(add=[("x-callout-request", "1"), ("x-sum", str(checksum))])


class AsyncHeavier(AsyncHeavy):
    milliseconds = 3


# -- ext_proc: BUFFERED response body replacement ---------------------------------------------


class AsyncBody(CalloutServer):
    async def on_response_body(self, body: Any, context: Any) -> Any:
        return add_body_mutation(body=body.body.upper())


class SyncBody(CalloutServer):
    def on_response_body(self, body: Any, context: Any) -> Any:
        return add_body_mutation(body=body.body.upper())


class InlineBody(CalloutServer):
    @nonblocking
    def on_response_body(self, body: Any, context: Any) -> Any:
        return add_body_mutation(body=body.body.upper())


# -- Tyk: a Pre hook that adds one header --------------------------------------------------------


async def add_header_async(call: PluginCall) -> None:
    call.request.set_header("X-Plugin", "calloutkit")


def add_header_sync(call: PluginCall) -> None:
    call.request.set_header("X-Plugin", "calloutkit")


TYK_PLUGIN = "AddHeader"

CALLOUTKIT: dict[tuple[str, str], Any] = {
    ("async", "headers"): AsyncHeaders, ("sync", "headers"): SyncHeaders,
    ("inline", "headers"): InlineHeaders, ("async", "heavy"): AsyncHeavy,
    ("async", "heavier"): AsyncHeavier,
    ("async", "body"): AsyncBody, ("sync", "body"): SyncBody, ("inline", "body"): InlineBody,
    ("async", "tyk"): lambda **kw: TykPluginServer(
        plugins=[Plugin(TYK_PLUGIN, add_header_async, hook=Hook.PRE)], **kw),
    ("sync", "tyk"): lambda **kw: TykPluginServer(
        plugins=[Plugin(TYK_PLUGIN, add_header_sync, hook=Hook.PRE)], **kw),
}


async def serve_floor(work: str, port: int, style: str) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    handler = floor.tyk_handler() if work == "tyk" else floor.ext_proc_handler(work, style)
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("impl", choices=["floor", "floor-readwrite", "async", "inline", "sync"])
    parser.add_argument("work", choices=["headers", "body", "tyk", "heavy", "heavier"])
    parser.add_argument("port", type=int)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--transport", choices=["grpcio", "native"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.impl.startswith("floor"):
        if args.loop == "uvloop":
            import uvloop

            uvloop.install()
        style = "readwrite" if args.impl == "floor-readwrite" else "iterator"
        asyncio.run(serve_floor(args.work, args.port, style))
        return
    server = CALLOUTKIT[args.impl, args.work](
        plaintext_address=("127.0.0.1", args.port), disable_tls=True,
        combined_health_check=True, workers=args.workers, event_loop=args.loop,
        transport=args.transport or os.environ.get("CALLOUTKIT_TRANSPORT", "grpcio"))
    server.run()


if __name__ == "__main__":
    main()
