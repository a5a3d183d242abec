"""HTTP health checks: a tiny HTTP/1.1 responder that tells the truth about the server.

GET and HEAD answer 200 with an empty body while the server is serving (as the documented
callout server does: some probes compare the body), and 503 ``draining`` from the moment it
starts draining; anything else is 405. Load balancers probe this; it runs on the server's own
event loop, so a stalled loop shows up as a failed probe, which is also the truth.

With metrics on, ``GET /metrics`` answers the Prometheus text instead; a listener of its own
for metrics (``metrics_address``) answers that path only, and 404 to any other.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable

logger = logging.getLogger(__name__)

_MAX_HEAD = 8192


class HttpHealthServer:
    """Serve ``GET``/``HEAD`` health probes on one address, optionally over HTTPS."""

    def __init__(self, is_serving: Callable[[], bool] | None, reuse_port: bool = False, *,
                 metrics: Callable[[], tuple[bytes, str]] | None = None) -> None:
        self._is_serving = is_serving  # None: a metrics listener, no health here
        self._reuse_port = reuse_port
        self._metrics = metrics
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> int:
        """Bind and start; return the bound port (useful with port 0)."""
        self._server = await asyncio.start_server(self._handle, host, port, ssl=tls,
                                                  reuse_address=True,
                                                  reuse_port=self._reuse_port or None)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            method, _, rest = head.decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            kind = "text/plain"
            if method not in ("GET", "HEAD"):
                status, body = "405 Method Not Allowed", b"method not allowed\n"
            elif self._metrics is not None and path == "/metrics":
                status = "200 OK"
                body, kind = self._metrics()
            elif self._is_serving is None:
                status, body = "404 Not Found", b"not found\n"
            elif self._is_serving():
                status, body = "200 OK", b""
            else:
                status, body = "503 Service Unavailable", b"draining\n"
            allow = "Allow: GET, HEAD\r\n" if status.startswith("405") else ""
            writer.write(
                (f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\n{allow}"
                 f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
                + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ConnectionError, ssl.SSLError):
            pass  # a probe that hangs up or sends garbage gets nothing; the server carries on
        finally:
            writer.close()
