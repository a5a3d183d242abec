"""observability: count the callbacks per phase and serve the counts over HTTP.

Nothing is changed: every callback counts its phase and lets the message through. The counts
are served on ``http://<host>:<metrics_port>/metrics`` in the Prometheus text format, and as
JSON on ``/counters``::

    calloutkit_callbacks_total{phase="request_headers"} 12
    calloutkit_callbacks_total{phase="response_headers"} 12

``metrics_port`` (argument, or ``METRICS_PORT``) defaults to 9464; 0 picks a free port, read
back from ``server.metrics_port``.

As it never changes anything, it also suits Envoy's ``observability_mode: true``, where Envoy
does not wait for the callout at all.

Envoy settings: any processing mode; with bodies STREAMED or BUFFERED the body phases are
counted too.

Run it::

    calloutkit serve examples/observability
    curl http://127.0.0.1:9464/metrics
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from typing import Any

from calloutkit import CalloutContext, CalloutServer, ConfigError

logger = logging.getLogger(__name__)

PHASES = ("request_headers", "request_body", "request_trailers",
          "response_headers", "response_body", "response_trailers")


class ObservabilityServer(CalloutServer):
    """Counts callbacks per phase; exposes them on ``/metrics`` and ``/counters``."""

    def __init__(self, *args: Any, metrics_port: int | None = None,
                 metrics_host: str = "0.0.0.0", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        port = metrics_port if metrics_port is not None else os.environ.get("METRICS_PORT",
                                                                            "9464")
        try:
            self.metrics_port = int(port)
        except ValueError:
            raise ConfigError(f"METRICS_PORT must be a port number, got {port!r}") from None
        self.metrics_host = metrics_host
        self.counts = dict.fromkeys(PHASES, 0)
        self._metrics: asyncio.Server | None = None

    # async callbacks run on the event loop, one at a time: the counters need no lock.
    async def on_request_headers(self, headers: Any, context: CalloutContext) -> None:
        self.counts["request_headers"] += 1

    async def on_request_body(self, body: Any, context: CalloutContext) -> None:
        self.counts["request_body"] += 1

    async def on_request_trailers(self, trailers: Any, context: CalloutContext) -> None:
        self.counts["request_trailers"] += 1

    async def on_response_headers(self, headers: Any, context: CalloutContext) -> None:
        self.counts["response_headers"] += 1

    async def on_response_body(self, body: Any, context: CalloutContext) -> None:
        self.counts["response_body"] += 1

    async def on_response_trailers(self, trailers: Any, context: CalloutContext) -> None:
        self.counts["response_trailers"] += 1

    def prometheus_text(self) -> str:
        """The counts in the Prometheus text exposition format."""
        lines = ["# HELP calloutkit_callbacks_total Callbacks handled, by phase.",
                 "# TYPE calloutkit_callbacks_total counter"]
        lines += [f'calloutkit_callbacks_total{{phase="{phase}"}} {count}'
                  for phase, count in self.counts.items()]
        return "\n".join(lines) + "\n"

    # -- the metrics endpoint, started and stopped with the server ---------------------------

    async def start(self) -> None:
        await super().start()
        try:
            self._metrics = await asyncio.start_server(self._serve_metrics, self.metrics_host,
                                                       self.metrics_port)
        except OSError as exc:
            await super().stop(0)
            raise ConfigError(f"cannot bind the metrics port {self.metrics_port}: "
                              f"{exc.strerror}") from None
        self.metrics_port = self._metrics.sockets[0].getsockname()[1]
        logger.info("metrics on http://%s:%d/metrics", self.metrics_host, self.metrics_port)

    async def stop(self, grace: float | None = None) -> None:
        await super().stop(grace)
        await self._close_metrics()

    async def wait_closed(self) -> None:
        await super().wait_closed()  # `run()` ends here after a signal
        await self._close_metrics()

    async def _close_metrics(self) -> None:
        server, self._metrics = self._metrics, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def _serve_metrics(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await reader.readline()
            while (await reader.readline()).strip():  # skip the request headers
                pass
            path = request_line.decode("latin-1").split(" ")[1] if b" " in request_line else ""
            if path == "/metrics":
                status, ctype, body = "200 OK", "text/plain; version=0.0.4", self.prometheus_text()
            elif path == "/counters":
                status, ctype, body = "200 OK", "application/json", json.dumps(self.counts)
            else:
                status, ctype, body = "404 Not Found", "text/plain", "try /metrics\n"
            data = body.encode()
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                         + data)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
