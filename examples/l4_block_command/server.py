"""L4 block command: close a Redis connection when the client sends a banned command.

The server follows the Redis protocol on the client side of each connection (RESP arrays
like ``*1\\r\\n$8\\r\\nFLUSHALL\\r\\n`` and inline commands like ``FLUSHALL\\r\\n``) to find
each command's name. When a banned one shows up, the chunk carrying it is dropped and the
connection is closed (``should_close_connection``), so the store never runs it; with
``RESET = True`` the connection is reset instead. Everything else passes through untouched.

A pipelined batch that contains a banned command is dropped whole (it arrives as one chunk).

Run it::

    calloutkit serve examples/l4_block_command --disable-tls --combined-health-check
"""

from __future__ import annotations

import logging
import types
from typing import Any

from extproc.service import command_line_tools
from extproc.service.network_callout_server import NetworkCalloutServer, NetworkContext

logger = logging.getLogger("l4_block_command")


class CommandScanner:
    """Finds command names in the client side of a Redis connection, chunk by chunk."""

    MAX_LINE = 64 * 1024

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._args = 0        # bulk strings still expected in the current array
        self._want_name = False
        self._name_length = -1
        self._skip = 0        # bytes of an argument (and its CRLF) still to pass over

    def feed(self, data: bytes) -> list[bytes]:
        """Return the (upper-cased) names of the commands that started in ``data``."""
        buffer, names = self._buffer, []
        buffer += data
        while buffer:
            if self._skip:
                taken = min(self._skip, len(buffer))
                del buffer[:taken]
                self._skip -= taken
                continue
            if self._name_length >= 0:
                if len(buffer) < self._name_length:
                    break
                names.append(bytes(buffer[:self._name_length]).upper())
                del buffer[:self._name_length]
                self._skip, self._name_length = 2, -1
                continue
            end = buffer.find(b"\n")
            if end < 0:
                if len(buffer) > self.MAX_LINE:  # not Redis; stop buffering it
                    buffer.clear()
                break
            line = bytes(buffer[:end]).rstrip(b"\r")
            del buffer[:end + 1]
            self._line(line, names)
        return names

    def _line(self, line: bytes, names: list[bytes]) -> None:
        try:
            if self._args:
                length = int(line[1:]) if line.startswith(b"$") else -1
                if length < 0:
                    raise ValueError("expected a bulk string")
                self._args -= 1
                if self._want_name:
                    self._want_name, self._name_length = False, length
                else:
                    self._skip = length + 2
            elif line.startswith(b"*"):
                self._args = max(0, int(line[1:]))
                self._want_name = self._args > 0
            elif line.strip():
                names.append(line.split()[0].upper())
        except ValueError:
            self._args, self._want_name = 0, False  # out of step: resynchronise on lines


class BlockCommand(NetworkCalloutServer):
    """Closes the connection before a banned Redis command reaches the store."""

    BANNED = frozenset({b"FLUSHALL", b"FLUSHDB", b"SHUTDOWN", b"DEBUG"})
    RESET = False

    def new_state(self) -> Any:
        return types.SimpleNamespace(scanner=CommandScanner(), blocked=None)

    def on_read_data(self, data: bytes, end_of_stream: bool, context: NetworkContext) -> None:
        for name in context.state.scanner.feed(data):
            if name in self.BANNED:
                context.state.blocked = name
                logger.warning("blocked %s from %s: closing the connection",
                               name.decode("ascii", "replace"), context.peer())
                if self.RESET:
                    context.reset_connection()
                break

    def should_close_connection(self, data: bytes, modified: bool,
                                context: NetworkContext) -> bool:
        return context.state.blocked is not None


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    BlockCommand(**vars(command_line_tools.add_command_line_args().parse_args())).run()
