"""L4 passthrough logger: log every chunk of every TCP connection, change nothing.

Each connection gets a number; each chunk is logged with its direction, size and the first
bytes, and a summary is logged once both sides have closed. Every chunk is forwarded as it
arrived (the callbacks return None).

Run it (plaintext gRPC on 8080, Envoy's network ext_proc filter pointing at it)::

    calloutkit serve examples/l4_passthrough_logger --disable-tls --combined-health-check
"""

from __future__ import annotations

import itertools
import logging
import types
from typing import Any

from extproc.service import command_line_tools
from extproc.service.network_callout_server import NetworkCalloutServer, NetworkContext

logger = logging.getLogger("l4_passthrough_logger")

PREVIEW = 48


class PassthroughLogger(NetworkCalloutServer):
    """Logs both directions of every connection and forwards the bytes unchanged."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._numbers = itertools.count(1)

    def new_state(self) -> Any:
        return types.SimpleNamespace(number=next(self._numbers), chunks=0)

    async def on_read_data(self, data: bytes, end_of_stream: bool,
                           context: NetworkContext) -> None:
        self._log(context, "client->upstream", data, end_of_stream)

    async def on_write_data(self, data: bytes, end_of_stream: bool,
                            context: NetworkContext) -> None:
        self._log(context, "upstream->client", data, end_of_stream)

    def _log(self, context: NetworkContext, direction: str, data: bytes, end: bool) -> None:
        state = context.state
        state.chunks += 1
        preview = data[:PREVIEW] + (b"..." if len(data) > PREVIEW else b"")
        logger.info("connection %d %s %d bytes%s: %r", state.number, direction, len(data),
                    " (end of stream)" if end else "", preview)
        if end and context.read_closed and context.write_closed:
            logger.info("connection %d done: %d chunks, %d bytes from the client, %d bytes "
                        "from the upstream", state.number, state.chunks, context.bytes_read,
                        context.bytes_written)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    PassthroughLogger(**vars(command_line_tools.add_command_line_args().parse_args())).run()
