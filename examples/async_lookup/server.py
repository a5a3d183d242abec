"""async_lookup: await a slow external lookup without holding up any other request.

Each request must carry ``x-api-key``. The callback is ``async def``: it awaits an HTTP
lookup of the key in a directory service (``GET <LOOKUP_URL>/keys/<key>``) and, while it
waits, the server's event loop goes on serving every other stream. Then:

- known key: the request goes on with ``x-user`` and ``x-plan`` set from the directory;
- unknown key: ``403``; no key: ``401``;
- directory down, failing or slower than ``LOOKUP_TIMEOUT`` seconds (default 1.5): ``503``,
  so a broken directory never lets a request through unchecked.

``LOOKUP_URL`` (or the ``lookup_url`` argument) defaults to ``http://127.0.0.1:8081``, where
``python examples/async_lookup/directory.py`` serves a demo directory.

The lookup client here is a few lines of asyncio so the example needs nothing else; in
real code use your async client of choice (httpx, aiohttp, an async database driver...).
What matters is ``await``: a blocking call would stall the event loop (use a plain ``def``
callback for blocking code: it runs in the thread pool).

Envoy settings: request headers SEND, and ``message_timeout`` above ``LOOKUP_TIMEOUT``
(Envoy's default, 200 ms, would answer 504 before a slow lookup returns).

Run it::

    python examples/async_lookup/directory.py &
    calloutkit serve examples/async_lookup
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import urllib.parse
from typing import Any

from envoy.config.core.v3.base_pb2 import HeaderValueOption
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    HeadersResponse,
    HttpHeaders,
    ImmediateResponse,
)

from calloutkit import (
    CalloutContext,
    CalloutServer,
    ConfigError,
    add_header_mutation,
    get_header,
    header_immediate_response,
)

logger = logging.getLogger(__name__)


class DirectoryError(Exception):
    """The directory could not answer."""


async def http_get_json(url: str) -> tuple[int, Any]:
    """``(status, parsed JSON body)`` of a plain-HTTP GET; the connection closes after it."""
    parts = urllib.parse.urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
    try:
        writer.write(f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                     "Accept: application/json\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        response = await reader.read()  # Connection: close frames the body
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[1].isdigit():
        raise DirectoryError(f"bad HTTP response from {parts.netloc}")
    return int(status_line[1]), json.loads(body) if body else None


def reject(code: int, message: str) -> ImmediateResponse:
    return header_immediate_response(
        code, headers=[("content-type", "application/json")],
        body=json.dumps({"error": message}) + "\n", details=f"calloutkit_lookup_{code}")


class AsyncLookupServer(CalloutServer):
    """Resolves ``x-api-key`` to a user and plan through an async lookup."""

    def __init__(self, *args: Any, lookup_url: str | None = None,
                 lookup_timeout: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lookup_url = (lookup_url or os.environ.get("LOOKUP_URL")
                           or "http://127.0.0.1:8081").rstrip("/")
        if not self.lookup_url.startswith("http://"):
            raise ConfigError(f"LOOKUP_URL must be an http:// URL, got {self.lookup_url!r}")
        try:
            self.lookup_timeout = float(lookup_timeout if lookup_timeout is not None
                                        else os.environ.get("LOOKUP_TIMEOUT", "1.5"))
        except ValueError:
            raise ConfigError("LOOKUP_TIMEOUT must be a number of seconds") from None

    async def lookup(self, api_key: str) -> dict[str, Any] | None:
        """The directory's entry for ``api_key``, None if unknown; `DirectoryError` if it fails."""
        url = f"{self.lookup_url}/keys/{urllib.parse.quote(api_key, safe='')}"
        try:
            async with asyncio.timeout(self.lookup_timeout):
                status, entry = await http_get_json(url)
        except (OSError, TimeoutError, ValueError) as exc:
            raise DirectoryError(f"{url}: {exc.__class__.__name__} {exc}") from exc
        if status == 404:
            return None
        if status != 200 or not isinstance(entry, dict):
            raise DirectoryError(f"{url}: HTTP {status}")
        return entry

    async def on_request_headers(self, headers: HttpHeaders, context: CalloutContext
                                 ) -> HeadersResponse | ImmediateResponse:
        api_key = get_header(headers, "x-api-key")
        if not api_key:
            return reject(401, "missing x-api-key")
        try:
            entry = await self.lookup(api_key)
        except DirectoryError as exc:
            logger.warning("key lookup failed: %s", exc)
            return reject(503, "key directory unavailable")
        if entry is None:
            return reject(403, "unknown api key")
        return add_header_mutation(
            add=[("x-user", str(entry.get("user", ""))), ("x-plan", str(entry.get("plan", "")))],
            remove=["x-api-key"],  # the upstream needs the identity, not the secret
            append_action=HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)
