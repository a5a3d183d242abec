"""OpenTelemetry spans around every callback (``pip install 'calloutkit[otel]'``).

One span per callback call, named ``<protocol> <phase>`` (``ext_proc request_headers``,
``ext_authz check``, ``tyk pre``), built as a middleware. Its parent is the trace context the
gateway sent: the gRPC metadata of the call (Envoy with tracing on puts its own span's
``traceparent`` there), else the request's own headers (an L7 stream's request headers, an
ext_authz check's, a Tyk call's), so a client's ``traceparent`` still links up when the
gateway does not trace.

calloutkit only asks the API for a tracer (`opentelemetry.trace.get_tracer`) and the global
propagator; the tracer provider, exporter and sampler are the application's or
``opentelemetry-instrument``'s, configured by the usual ``OTEL_*`` variables. This module is
imported only when tracing is on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import SpanKind, Status, StatusCode

from ._errors import StreamAbort

if TYPE_CHECKING:
    from ._middleware import CallInfo

TRACER_NAME = "calloutkit"


class _MappingGetter(Getter[Any]):
    """Reads a propagation field from gRPC metadata pairs or a headers mapping, whatever the
    case of its key (Tyk's headers come canonicalised, ``Traceparent``)."""

    def get(self, carrier: Any, key: str) -> list[str] | None:
        if isinstance(carrier, Mapping):
            value = carrier.get(key)
            if value is None:
                for name, item in carrier.items():
                    if isinstance(name, str) and name.lower() == key:
                        value = item
                        break
            if value is None:
                return None
            return [value] if isinstance(value, str) else [str(v) for v in value]
        found = [value for name, value in carrier if name == key and isinstance(value, str)]
        return found or None

    def keys(self, carrier: Any) -> list[str]:
        if isinstance(carrier, Mapping):
            return [str(name) for name in carrier]
        return [name for name, _ in carrier]


_GETTER = _MappingGetter()


def _parent(call: CallInfo) -> Context | None:
    """The trace context the gateway sent with this call, or None when it sent none."""
    try:
        metadata = call.context.invocation_metadata() if call.context is not None else None
    except Exception:  # a context without gRPC metadata (Tyk's PluginCall, a test's)
        metadata = None
    if metadata:
        found = propagate.extract(metadata, getter=_GETTER)
        if trace.get_current_span(found).get_span_context().is_valid:
            return found
    headers = _request_headers(call)  # read only when the metadata had nothing
    if headers:
        found = propagate.extract(headers, getter=_GETTER)
        if trace.get_current_span(found).get_span_context().is_valid:
            return found
    return None


def _request_headers(call: CallInfo) -> Mapping[str, Any] | None:
    """The HTTP request's headers where the call knows them, else None: an L7 stream's
    (from any phase on), a Tyk call's, an ext_authz check's."""
    try:
        for headers in (getattr(call.context, "request_headers_map", None),
                        getattr(getattr(call.context, "request", None), "headers", None),
                        getattr(call.message, "headers", None)):
            if isinstance(headers, Mapping):
                return headers
    except Exception:  # a headers accessor that cannot read what it was given
        return None
    return None


def _outcome(result: Any) -> tuple[str, int | None]:
    """What the callback answered, as far as it is cheap to tell: ``immediate_response`` and
    its HTTP status (L7: an `ImmediateResponse`, or a `ProcessingResponse` holding one),
    ``denied`` and its status (ext_authz), else ``ok``."""
    descriptor = getattr(result, "DESCRIPTOR", None)
    kind = getattr(descriptor, "name", None)
    if kind == "ImmediateResponse":
        return "immediate_response", int(result.status.code)
    if kind == "ProcessingResponse" and result.HasField("immediate_response"):
        return "immediate_response", int(result.immediate_response.status.code)
    if kind == "CheckResponse" and result.HasField("denied_response"):
        return "denied", int(result.denied_response.status.code)
    return "ok", None


def tracing_middleware(
        error_policy: Callable[[], str | None]) -> Callable[[CallInfo, Callable[[], Any]], Any]:
    """The middleware that makes one span per callback call. ``error_policy`` names what
    answers a callback that raised (read when one does: the server kinds set it after the
    middleware is built). The tracer is the API's proxy until a provider is set, so a
    provider set after the server is built is still used."""
    tracer = trace.get_tracer(TRACER_NAME)

    async def middleware(call: CallInfo, proceed: Callable[[], Any]) -> Any:
        attributes = {"calloutkit.protocol": call.protocol, "calloutkit.phase": call.phase,
                      "calloutkit.callback": call.callback}
        with tracer.start_as_current_span(
                f"{call.protocol} {call.phase}", context=_parent(call),
                kind=SpanKind.SERVER, attributes=attributes, record_exception=False,
                set_status_on_exception=False) as span:
            try:
                result = await proceed()
            except StreamAbort as abort:
                # The callback's own choice to end the stream, not an error of it.
                span.set_attribute("calloutkit.outcome", "aborted")
                span.set_attribute("rpc.grpc.status_code", abort.code.value[0])
                raise
            except Exception as exc:
                span.set_attribute("calloutkit.outcome", error_policy() or "error")
                span.set_attribute("error.type", type(exc).__qualname__)
                span.set_status(Status(StatusCode.ERROR))
                raise
            outcome, status = _outcome(result)
            span.set_attribute("calloutkit.outcome", outcome)
            if status is not None:
                span.set_attribute("http.response.status_code", status)
            return result

    return middleware
