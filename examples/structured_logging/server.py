"""structured_logging: one JSON line per request, with what an operator looks for.

Each request is logged once, when its response is complete, as a single JSON object::

    {"time": "2025-01-01T12:00:00.000Z", "severity": "INFO", "message": "GET /hello 200",
     "request_id": "...", "method": "GET", "path": "/hello", "authority": "example.com",
     "user_agent": "curl/8.5.0", "status": 200, "request_bytes": 0, "response_bytes": 42,
     "timings_ms": {"response_headers": 12.3}}

``timings_ms`` holds, for each later phase the callout saw, the milliseconds since the
request headers arrived: ``response_headers`` is roughly the upstream's time to answer,
``request_body`` / ``response_body`` (when bodies are sent) when each body ended.

The lines go to stdout (or the ``stream`` argument) through a logger of their own,
``calloutkit.examples.access``, so the server's own logs stay apart. With
``google-cloud-logging`` installed and ``CLOUD_LOGGING=1`` (or ``cloud_logging=True``), they
also go to Cloud Logging as structured entries (``jsonPayload``).

Envoy settings: request and response headers SEND; bodies as you like (with STREAMED or
BUFFERED bodies the byte counts are measured, otherwise taken from ``content-length``).

Run it::

    calloutkit serve examples/structured_logging
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import logging
import os
import sys
import time
from typing import Any, TextIO

from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3.external_processor_pb2 import HttpBody, HttpHeaders, HttpTrailers

from calloutkit import CalloutContext, CalloutServer, get_header, header_dict, nonblocking

ACCESS_LOGGER = "calloutkit.examples.access"


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: its ``fields`` plus time, severity and message."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        entry = {"time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                 "severity": record.levelname, "message": record.getMessage()}
        entry.update(getattr(record, "json_fields", {}))
        return json.dumps(entry, separators=(",", ":"))


@dataclasses.dataclass
class RequestLog:
    """What one stream has seen so far."""

    started: float = dataclasses.field(default_factory=time.monotonic)
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    timings_ms: dict[str, float] = dataclasses.field(default_factory=dict)
    request_bytes: int = 0
    response_bytes: int = 0
    logged: bool = False

    def mark(self, phase: str) -> None:
        self.timings_ms[phase] = round((time.monotonic() - self.started) * 1000, 3)


def _content_length(headers: HttpHeaders) -> int:
    value = get_header(headers, "content-length", "0") or "0"
    return int(value) if value.isdigit() else 0


class StructuredLoggingServer(CalloutServer):
    """Logs every request as one JSON line; never changes the request or the response."""

    def __init__(self, *args: Any, stream: TextIO | None = None,
                 cloud_logging: bool | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.access_log = logging.getLogger(ACCESS_LOGGER)
        self.access_log.setLevel(logging.INFO)
        self.access_log.propagate = False  # the JSON lines are the product; no double logging
        for old in list(self.access_log.handlers):
            self.access_log.removeHandler(old)
        handler = logging.StreamHandler(stream or sys.stdout)
        handler.setFormatter(JsonFormatter())
        self.access_log.addHandler(handler)
        if cloud_logging is None:
            cloud_logging = os.environ.get("CLOUD_LOGGING", "").lower() in ("1", "true", "yes")
        if cloud_logging:
            self.access_log.addHandler(self._cloud_handler())

    @staticmethod
    def _cloud_handler() -> logging.Handler:
        if importlib.util.find_spec("google.cloud.logging") is None:
            from calloutkit import ConfigError

            raise ConfigError("CLOUD_LOGGING is on but google-cloud-logging is not installed: "
                              "pip install google-cloud-logging")
        import google.cloud.logging  # type: ignore[import-not-found, unused-ignore]
        from google.cloud.logging.handlers import (  # type: ignore[import-not-found, unused-ignore]
            CloudLoggingHandler,
        )

        handler: logging.Handler = CloudLoggingHandler(google.cloud.logging.Client(),
                                                       name="calloutkit-access")
        return handler

    def new_state(self) -> RequestLog:
        return RequestLog()

    @nonblocking
    def on_request_headers(self, headers: HttpHeaders, context: CalloutContext) -> None:
        log: RequestLog = context.state
        log.started = time.monotonic()  # the clock of every timing starts here
        values = header_dict(headers)
        log.fields.update(request_id=values.get("x-request-id"), method=values.get(":method"),
                          path=values.get(":path"), authority=values.get(":authority"),
                          user_agent=values.get("user-agent"))
        log.request_bytes = _content_length(headers)

    @nonblocking
    def on_request_body(self, body: HttpBody, context: CalloutContext) -> None:
        log: RequestLog = context.state
        if "request_body" not in log.timings_ms:
            log.request_bytes = 0  # measured from now on, not taken from content-length
        log.request_bytes += len(body.body)
        log.mark("request_body")

    @nonblocking
    def on_response_headers(self, headers: HttpHeaders, context: CalloutContext) -> None:
        log: RequestLog = context.state
        log.mark("response_headers")
        status = get_header(headers, ":status", "0") or "0"
        log.fields["status"] = int(status) if status.isdigit() else 0
        log.response_bytes = _content_length(headers)
        if headers.end_of_stream or context.response_body_mode == ProcessingMode.NONE:
            self.emit(log)

    @nonblocking
    def on_response_body(self, body: HttpBody, context: CalloutContext) -> None:
        log: RequestLog = context.state
        if "response_body" not in log.timings_ms:
            log.response_bytes = 0
        log.response_bytes += len(body.body)
        log.mark("response_body")
        if body.end_of_stream:
            self.emit(log)

    @nonblocking
    def on_response_trailers(self, trailers: HttpTrailers, context: CalloutContext) -> None:
        log: RequestLog = context.state
        log.mark("response_trailers")
        self.emit(log)

    def emit(self, log: RequestLog) -> None:
        """Write the request's line, once."""
        if log.logged:
            return
        log.logged = True
        fields = {**log.fields, "request_bytes": log.request_bytes,
                  "response_bytes": log.response_bytes, "timings_ms": log.timings_ms}
        status = fields.get("status", 0)
        level = logging.ERROR if status >= 500 else (
            logging.WARNING if status >= 400 else logging.INFO)
        self.access_log.log(level, "%s %s %s", fields.get("method"), fields.get("path"), status,
                            extra={"json_fields": fields})
