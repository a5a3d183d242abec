"""`UpstreamServer`: a local HTTP/1.1 upstream that echoes what reached it.

It answers every request with JSON describing the request as the upstream saw it (method,
path, headers, header_lines, body, trailers), so a test can check what a callout changed on
the way in, and it takes instructions in request headers to shape the response on the way out:

- ``x-echo-status: 201``: the status code
- ``x-echo-header: name=value``: add a response header (repeatable, comma-separated)
- ``x-echo-trailer: name=value``: answer chunked, with this trailer
- ``x-echo-raw: 1``: answer with the request body itself instead of JSON
- ``x-echo-body: text``: answer with this text instead of JSON
"""

from __future__ import annotations

import json
import socketserver
import threading
from typing import Any

from ._http1 import encode_chunked, read_body, read_head


class _Handler(socketserver.StreamRequestHandler):
    server: _TCPServer

    def handle(self) -> None:
        while True:
            try:
                start, headers = read_head(self.rfile)  # type: ignore[arg-type]
                body, trailers = read_body(self.rfile, headers,  # type: ignore[arg-type]
                                           until_close=False)
            except (ConnectionError, ValueError, OSError):
                return
            method, target = [*start.split(" "), "", ""][:2]
            seen: dict[str, Any] = {"method": method, "path": target,
                    "headers": {k.lower(): v for k, v in headers},
                    # every header line in order: "headers" keeps only the last of repeats
                    "header_lines": [[k.lower(), v] for k, v in headers],
                    "body": body.decode("utf-8", "replace"), "body_length": len(body),
                    "trailers": {k.lower(): v for k, v in trailers}}
            self.server.record(seen)
            self._respond(seen, body)
            if seen["headers"].get("connection", "").lower() == "close":
                return

    def _respond(self, seen: dict[str, Any], body: bytes) -> None:
        req: dict[str, str] = seen["headers"]
        status = int(req.get("x-echo-status", "200"))
        extra = [tuple(p.strip().split("=", 1)) for p in req.get("x-echo-header", "").split(",")
                 if "=" in p]
        trailers = [tuple(p.strip().split("=", 1))
                    for p in req.get("x-echo-trailer", "").split(",") if "=" in p]
        if "x-echo-raw" in req:
            payload, ctype = body, "application/octet-stream"
        elif "x-echo-body" in req:
            payload, ctype = req["x-echo-body"].encode(), "text/plain"
        else:
            payload, ctype = json.dumps(seen).encode(), "application/json"
        head = [f"HTTP/1.1 {status} OK", f"Content-Type: {ctype}"]
        head += [f"{k}: {v}" for k, v in extra]
        if trailers:
            head += ["Transfer-Encoding: chunked", "Trailer: " + ", ".join(k for k, _ in trailers)]
            data = encode_chunked([payload], trailers)  # type: ignore[arg-type]
        else:
            head.append(f"Content-Length: {len(payload)}")
            data = payload
        self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + data)
        self.wfile.flush()


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, _Handler)
        self.seen: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def record(self, seen: dict[str, Any]) -> None:
        with self._lock:
            self.seen.append(seen)
            del self.seen[:-1000]


class UpstreamServer:
    """An echoing HTTP/1.1 upstream on a free loopback port, run in a background thread.

    Example::

        with UpstreamServer() as upstream:
            print(upstream.port)            # point Envoy's upstream cluster here
            ...
            assert upstream.requests[-1]["headers"]["x-added"] == "1"
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = _TCPServer((host, port))
        self.host = host
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="calloutkit-upstream", daemon=True)

    @property
    def requests(self) -> list[dict[str, Any]]:
        """What the upstream has seen, oldest first (the last 1000 requests)."""
        return list(self._server.seen)

    def start(self) -> UpstreamServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> UpstreamServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
