"""request_timing: per-stream state; stamp each response with the time since its request.

``new_state`` gives every stream (every HTTP request) its own `Timing` object, reachable as
``context.state`` from every callback of that stream. The request-headers callback notes
the time; the response-headers callback adds

- ``x-request-time-ms: 12.345``: milliseconds from the request headers reaching the callout
  to the response headers reaching it (the upstream's time, plus the request body's);
- ``server-timing: gateway;dur=12.345``, which browsers' developer tools display.

Envoy settings: request and response headers SEND (the defaults).

Run it::

    calloutkit serve examples/request_timing
"""

from __future__ import annotations

import dataclasses
import time

from envoy.service.ext_proc.v3.external_processor_pb2 import HeadersResponse, HttpHeaders

from calloutkit import CalloutContext, CalloutServer, add_header_mutation, nonblocking


@dataclasses.dataclass
class Timing:
    """What one stream remembers between its callbacks."""

    started: float = 0.0


class RequestTimingServer(CalloutServer):
    """Adds ``x-request-time-ms`` and ``server-timing`` to every response."""

    def new_state(self) -> Timing:
        return Timing()

    @nonblocking
    def on_request_headers(self, headers: HttpHeaders, context: CalloutContext) -> None:
        context.state.started = time.monotonic()

    @nonblocking
    def on_response_headers(self, headers: HttpHeaders,
                            context: CalloutContext) -> HeadersResponse | None:
        timing: Timing = context.state
        if not timing.started:
            return None  # request headers were not sent to us (request_header_mode: SKIP)
        elapsed = f"{(time.monotonic() - timing.started) * 1000:.3f}"
        return add_header_mutation(add=[("x-request-time-ms", elapsed),
                                        ("server-timing", f"gateway;dur={elapsed}")])
