"""L4 redact: mask card numbers in what the upstream sends back to the client.

A run of 13 to 19 digits (single spaces or dashes allowed between them) that passes the Luhn
check is masked to its last four digits: ``4111 1111 1111 1111`` becomes
``**** **** **** 1111``. Masking keeps the length, so framing (Content-Length, RESP bulk
lengths) stays valid. Requests pass through untouched.

A card number can be split across two chunks. When a chunk ends in digits the redactor holds
those last few bytes back and sends them with the next chunk (or at the end of the stream),
so a response that ends in a digit with nothing after it waits for more data.

Run it::

    calloutkit serve examples/l4_redact --disable-tls --combined-health-check
"""

from __future__ import annotations

import logging
import re
import types
from typing import Any

from calloutkit import nonblocking
from extproc.service import command_line_tools
from extproc.service.network_callout_server import (
    NetworkCalloutServer,
    NetworkContext,
    ProcessingResult,
)

_CANDIDATE = re.compile(rb"(?<!\d)\d(?:[ -]?\d){12,18}(?!\d)")
# What may still grow into a card number: trailing digits and separators (at most 19 + 18).
_TAIL = re.compile(rb"\d[\d -]{0,36}\Z")


def luhn_valid(digits: bytes) -> bool:
    """The Luhn checksum that every payment card number satisfies.

    >>> luhn_valid(b"4111111111111111"), luhn_valid(b"4111111111111112")
    (True, False)
    """
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = char - 48
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _mask(match: re.Match[bytes]) -> bytes:
    text = match.group()
    digits = bytes(c for c in text if 48 <= c <= 57)
    if not luhn_valid(digits):
        return text
    keep = len(digits) - 4
    out, seen = bytearray(), 0
    for char in text:
        if 48 <= char <= 57:
            out.append(42 if seen < keep else char)  # '*'
            seen += 1
        else:
            out.append(char)
    return bytes(out)


class Redactor:
    """Masks card numbers in a byte stream delivered in arbitrary chunks."""

    def __init__(self) -> None:
        self._held = b""
        self._last = b""  # the byte before: a digit there means no card number starts here

    def feed(self, data: bytes, end_of_stream: bool) -> bytes:
        """Return the masked bytes that can go out now."""
        buffer = self._held + data
        tail = None if end_of_stream else _TAIL.search(buffer, max(0, len(buffer) - 37))
        cut = tail.start() if tail is not None else len(buffer)
        self._held = buffer[cut:]
        ready = self._last + buffer[:cut]
        if cut:
            self._last = buffer[cut - 1:cut]
        return _CANDIDATE.sub(_mask, ready)[len(ready) - cut:]


class Redact(NetworkCalloutServer):
    """Masks payment card numbers in responses."""

    def new_state(self) -> Any:
        return types.SimpleNamespace(redactor=Redactor())

    @nonblocking
    def on_write_data(self, data: bytes, end_of_stream: bool,
                      context: NetworkContext) -> ProcessingResult:
        out = context.state.redactor.feed(data, end_of_stream)
        return ProcessingResult(processed_data=out, modified=out != data)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    Redact(**vars(command_line_tools.add_command_line_args().parse_args())).run()
