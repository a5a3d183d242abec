"""Just enough of the protobuf wire format to read a routing key out of a raw frame.

The proxy never decodes what it forwards: frames stay the exact bytes the client sent. A
director that routes on a field of the first message reads that field from the frame with
`fields`, which walks one level of a message and steps over everything it was not asked for
by length, so a large request body inside costs nothing and no generated code is needed.

Example::

    >>> list(fields(b"\\x08\\x01\\x12\\x02hi"))
    [(1, 1), (2, b'hi')]
"""

from __future__ import annotations

from collections.abc import Container, Iterator

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while pos < end and shift < 70:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
    raise WireError("truncated or overlong varint")


def fields(data: bytes, wanted: Container[int] | None = None) -> Iterator[tuple[int, int | bytes]]:
    """Yield ``(field number, value)`` for the fields of one message level, in wire order.

    A value is an int for varint and fixed-width fields and ``bytes`` for length-delimited ones
    (strings, sub-messages, map entries, packed lists). With ``wanted``, other fields are
    skipped without being copied. Raises `WireError` on malformed input.
    """
    end = len(data)
    pos = 0
    while pos < end:
        key, pos = _varint(data, pos, end)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        take = wanted is None or number in wanted
        if wire_type == _LEN:
            size, pos = _varint(data, pos, end)
            if pos + size > end:
                raise WireError(f"field {number} runs past the end of the message")
            if take:
                yield number, data[pos:pos + size]
            pos += size
        elif wire_type == _VARINT:
            value, pos = _varint(data, pos, end)
            if take:
                yield number, value
        elif wire_type in (_I64, _I32):
            width = 8 if wire_type == _I64 else 4
            if pos + width > end:
                raise WireError(f"field {number} runs past the end of the message")
            if take:
                yield number, int.from_bytes(data[pos:pos + width], "little")
            pos += width
        else:
            raise WireError(f"field {number} has unsupported wire type {wire_type}")


def string_map_entry(entry: bytes) -> tuple[str, str]:
    """Decode one ``map<string, string>`` entry (key is field 1, value field 2)."""
    key = value = ""
    for number, raw in fields(entry, (1, 2)):
        if isinstance(raw, bytes):
            if number == 1:
                key = raw.decode("utf-8", "replace")
            else:
                value = raw.decode("utf-8", "replace")
    return key, value
