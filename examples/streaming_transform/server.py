"""streaming_transform: rewrite bodies chunk by chunk, in constant memory, whatever their size.

Every occurrence of a secret word (``REDACT_WORDS``, comma-separated; default ``secret``) is
masked with ``*`` in request and response bodies as they stream through. Envoy hands the
body over in chunks (STREAMED mode) and forwards each answer at once, so neither Envoy nor
the callout ever holds the whole body: a 50 MB upload costs this server a few chunks of
memory.

A word can straddle two chunks, so each direction keeps the last ``len(word) - 1`` bytes back
and emits them with the next chunk (or at the end of the body). Chunks may change size in
STREAMED mode: Envoy drops ``content-length`` and sends the body on chunked.

Envoy settings: ``request_body_mode: STREAMED`` and ``response_body_mode: STREAMED``. Keep
the trailer modes at SKIP: when trailers follow, Envoy marks no chunk as the last one, so the
bytes kept back could not be sent.

Run it::

    REDACT_WORDS=password,secret calloutkit serve examples/streaming_transform
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from envoy.service.ext_proc.v3.external_processor_pb2 import BodyResponse, HttpBody

from calloutkit import CalloutContext, CalloutServer, ConfigError, add_body_mutation, nonblocking


class Redactor:
    """Masks words in a byte stream fed chunk by chunk.

    >>> r = Redactor([b"secret"])
    >>> r.feed(b"my sec", last=False) + r.feed(b"ret!", last=True)
    b'my ******!'
    """

    __slots__ = ("_keep", "_pending", "_words")

    def __init__(self, words: Sequence[bytes]) -> None:
        self._words = [(word, b"*" * len(word)) for word in words]
        self._keep = max(len(word) for word in words) - 1
        self._pending = b""

    def feed(self, chunk: bytes, last: bool) -> bytes:
        """The masked bytes that are final once ``chunk`` is added."""
        data = self._pending + chunk
        for word, mask in self._words:
            data = data.replace(word, mask)
        if last or not self._keep:
            self._pending = b""
            return data
        # the tail may be the start of a word that the next chunk completes
        self._pending = data[-self._keep:]
        return data[:-self._keep]


@dataclasses.dataclass
class Streams:
    """Per-stream state: one redactor per direction."""

    request: Redactor
    response: Redactor


class StreamingTransformServer(CalloutServer):
    """Masks ``REDACT_WORDS`` in streamed request and response bodies."""

    def __init__(self, *args: Any, words: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if words is None:
            words = os.environ.get("REDACT_WORDS", "secret").split(",")
        self.words = [w.strip().encode() for w in words if w.strip()]
        if not self.words or any(b"*" in w for w in self.words):
            raise ConfigError("REDACT_WORDS needs at least one word, without '*'")

    def new_state(self) -> Streams:
        return Streams(Redactor(self.words), Redactor(self.words))

    # bytes.replace on one chunk takes microseconds: run inline, no thread hop per chunk
    @nonblocking
    def on_request_body(self, body: HttpBody, context: CalloutContext) -> BodyResponse:
        return _chunk(context.state.request.feed(body.body, body.end_of_stream))

    @nonblocking
    def on_response_body(self, body: HttpBody, context: CalloutContext) -> BodyResponse:
        return _chunk(context.state.response.feed(body.body, body.end_of_stream))


def _chunk(data: bytes) -> BodyResponse:
    # Nothing final yet (all of it held back) must empty the chunk: an empty body alone
    # would leave it unchanged.
    return add_body_mutation(body=data, clear_body=not data)
