"""L4 rewrite: replace byte patterns in both directions, with lengths changing.

The story: clients address keys as ``user:42``, while the shared store behind Envoy keeps
each tenant under its own prefix. Requests get the prefix added on the way in
(``user:`` -> ``tenant-a:user:``, longer) and responses get it stripped on the way out
(``tenant-a:user:`` -> ``user:``, shorter). Edit ``READ_REWRITES`` / ``WRITE_REWRITES``.

TCP chunks fall wherever they fall, so a pattern can be split across two chunks. The rewriter
keeps the end of a chunk back when it is the beginning of a pattern, and sends it with the
next chunk (or at the end of the stream); everything else is forwarded at once.

Run it::

    calloutkit serve examples/l4_rewrite --disable-tls --combined-health-check
"""

from __future__ import annotations

import logging
import re
import types
from collections.abc import Sequence
from typing import Any

from calloutkit import nonblocking
from extproc.service import command_line_tools
from extproc.service.network_callout_server import (
    NetworkCalloutServer,
    NetworkContext,
    ProcessingResult,
)

Rewrites = Sequence[tuple[bytes, bytes]]


class StreamRewriter:
    """Replaces patterns in a byte stream delivered in arbitrary chunks (one per direction)."""

    def __init__(self, rewrites: Rewrites) -> None:
        self._table = dict(rewrites)
        self._pattern = re.compile(b"|".join(re.escape(old) for old, _ in rewrites))
        self._prefixes = {old[:n] for old, _ in rewrites for n in range(1, len(old))}
        self._longest = max((len(old) for old, _ in rewrites), default=1)
        self._held = b""

    def feed(self, data: bytes, end_of_stream: bool) -> bytes:
        """Return the rewritten bytes that can go out now."""
        buffer = self._held + data
        keep = 0 if end_of_stream else self._partial_tail(buffer)
        self._held = buffer[len(buffer) - keep:] if keep else b""
        ready = buffer[:len(buffer) - keep]
        return self._pattern.sub(lambda m: self._table[m.group()], ready)

    def _partial_tail(self, buffer: bytes) -> int:
        # Only bytes after the last complete match can start a match that is still arriving.
        last_end = 0
        for match in self._pattern.finditer(buffer, max(0, len(buffer) - 2 * self._longest)):
            last_end = match.end()
        for size in range(min(self._longest - 1, len(buffer) - last_end), 0, -1):
            if buffer[-size:] in self._prefixes:
                return size
        return 0


class KeyspaceRewrite(NetworkCalloutServer):
    """Adds a tenant prefix to keys in requests and strips it from responses."""

    READ_REWRITES: Rewrites = ((b"user:", b"tenant-a:user:"),)
    WRITE_REWRITES: Rewrites = ((b"tenant-a:user:", b"user:"),)

    def new_state(self) -> Any:
        return types.SimpleNamespace(read=StreamRewriter(self.READ_REWRITES),
                                     write=StreamRewriter(self.WRITE_REWRITES))

    @nonblocking
    def on_read_data(self, data: bytes, end_of_stream: bool,
                     context: NetworkContext) -> ProcessingResult:
        out = context.state.read.feed(data, end_of_stream)
        return ProcessingResult(processed_data=out, modified=out != data)

    @nonblocking
    def on_write_data(self, data: bytes, end_of_stream: bool,
                      context: NetworkContext) -> ProcessingResult:
        out = context.state.write.feed(data, end_of_stream)
        return ProcessingResult(processed_data=out, modified=out != data)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    KeyspaceRewrite(**vars(command_line_tools.add_command_line_args().parse_args())).run()
