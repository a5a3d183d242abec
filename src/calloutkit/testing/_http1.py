"""A minimal HTTP/1.1 client and message parser, with chunked bodies and trailers.

The standard library cannot send request trailers nor read response trailers; callouts that
touch trailers need both to be tested, so calloutkit carries this small, strict implementation
for its testing tools and demo. Not a general-purpose client.
"""

from __future__ import annotations

import dataclasses
import socket
import ssl
import urllib.parse
from collections.abc import Iterable, Sequence
from typing import BinaryIO

Headers = list[tuple[str, str]]


@dataclasses.dataclass
class HttpResponse:
    """What `http_request` got back: status, headers (in order), body and trailers."""

    status: int
    headers: Headers
    body: bytes
    trailers: Headers = dataclasses.field(default_factory=list)

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first value of header ``name`` (case-insensitive)."""
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), default)

    def trailer(self, name: str, default: str | None = None) -> str | None:
        """The first value of trailer ``name`` (case-insensitive)."""
        name = name.lower()
        return next((v for k, v in self.trailers if k.lower() == name), default)


def read_head(rfile: BinaryIO) -> tuple[str, Headers]:
    """Read a start line and header block; return ``(start line, headers)``."""
    start = rfile.readline(65537)
    if not start:
        raise ConnectionError("connection closed before a message started")
    headers = read_fields(rfile)
    return start.decode("latin-1").rstrip("\r\n"), headers


def read_fields(rfile: BinaryIO) -> Headers:
    fields: Headers = []
    while True:
        line = rfile.readline(65537)
        if line in (b"\r\n", b"\n", b""):
            return fields
        name, _, value = line.decode("latin-1").partition(":")
        fields.append((name.strip(), value.strip()))


def read_body(rfile: BinaryIO, headers: Headers, *, until_close: bool) -> tuple[bytes, Headers]:
    """Read a body framed by content-length, chunked encoding, or (responses) connection close."""
    lookup = {k.lower(): v for k, v in headers}
    if "chunked" in lookup.get("transfer-encoding", "").lower():
        parts: list[bytes] = []
        while True:
            size_line = rfile.readline(65537)
            if not size_line:
                raise ConnectionError("connection closed inside a chunked body")
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                return b"".join(parts), read_fields(rfile)
            parts.append(_read_exact(rfile, size))
            rfile.readline(3)
    if "content-length" in lookup:
        return _read_exact(rfile, int(lookup["content-length"])), []
    return (rfile.read() if until_close else b""), []


def _read_exact(rfile: BinaryIO, size: int) -> bytes:
    data = rfile.read(size)
    if len(data) != size:
        raise ConnectionError(f"body ended after {len(data)} of {size} bytes")
    return data


def encode_chunked(chunks: Iterable[bytes], trailers: Sequence[tuple[str, str]] = ()) -> bytes:
    """Encode body chunks (and trailers) with HTTP/1.1 chunked transfer coding."""
    out = bytearray()
    for chunk in chunks:
        if chunk:
            out += b"%x\r\n%s\r\n" % (len(chunk), chunk)
    out += b"0\r\n" + b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in trailers) + b"\r\n"
    return bytes(out)


def http_request(url: str, method: str = "GET", headers: Sequence[tuple[str, str]] = (),
                 body: bytes | str | None = None, *, chunks: Iterable[bytes] | None = None,
                 trailers: Sequence[tuple[str, str]] = (), timeout: float = 10.0,
                 tls: ssl.SSLContext | None = None) -> HttpResponse:
    """Send one HTTP/1.1 request and read the whole response, trailers included.

    Give ``body`` for a content-length body, or ``chunks`` (and ``trailers``) for a chunked
    one. Informational answers (``100 Continue``, ``103 Early Hints``, ...) are skipped: the
    result is the final response (or a ``101 Switching Protocols``, without a body).

    Example::

        r = http_request(envoy.url + "/upload", "POST", chunks=[b"a", b"b"],
                         trailers=[("x-sum", "2")])
        assert r.status == 200
    """
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https"
                                                               else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}"]
    lines += [f"{k}: {v}" for k, v in headers]
    payload = b""
    if chunks is not None or trailers:
        lines.append("Transfer-Encoding: chunked")
        if trailers:
            lines.append("Trailer: " + ", ".join(k for k, _ in trailers))
        payload = encode_chunked(chunks or [], trailers)
    elif body is not None:
        payload = body.encode() if isinstance(body, str) else body
        lines.append(f"Content-Length: {len(payload)}")
    lines.append("Connection: close")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload
    with socket.create_connection((host, port), timeout=timeout) as sock:
        conn: socket.socket = sock
        if parts.scheme == "https":
            conn = (tls or ssl.create_default_context()).wrap_socket(sock, server_hostname=host)
        conn.sendall(raw)
        with conn.makefile("rb") as rfile:
            start, response_headers = read_head(rfile)
            status = int(start.split(" ", 2)[1])
            # 100 Continue, 102, 103 Early Hints...: informational, the answer follows. 101
            # is the last HTTP/1.1 message on the connection.
            while 100 <= status < 200 and status != 101:
                start, response_headers = read_head(rfile)
                status = int(start.split(" ", 2)[1])
            if method == "HEAD" or status in (101, 204, 304):
                return HttpResponse(status, response_headers, b"")
            data, response_trailers = read_body(rfile, response_headers, until_close=True)
            return HttpResponse(status, response_headers, data, response_trailers)
