"""`AuthzServer`: Envoy's external authorization service (``envoy.service.auth.v3``).

Envoy's ext_authz filter makes one unary ``Authorization/Check`` call per HTTP request, before
the request goes anywhere, and waits for the answer: allow (with header and query changes) or
deny (with the status, body and headers the client gets). Per call: count it in (refused while
draining), run ``on_check`` through the runtime's invoker (``def`` in the pool, ``async def``
on the loop), turn its return value into a ``CheckResponse``, serialize it. A failing callback
is logged and answered by the error policy; its text never reaches Envoy.
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn

import grpc
from envoy.service.auth.v3 import external_auth_pb2 as apb

from ..runtime import _logging
from ..runtime._errors import (
    CalloutError,
    ConfigError,
    ErrorPolicy,
    StreamAbort,
    parse_error_policy,
)
from ..runtime._malformed import MalformedInput, describe
from ..runtime._server import BaseServer, Handlers
from ._request import AuthzRequest
from ._tools import allow_request, deny_request

logger = logging.getLogger(__name__)

SERVICE_NAME = "envoy.service.auth.v3.Authorization"

_ALLOW: bytes = allow_request().SerializeToString()
_GENERIC_BODY = "authorization check failed\n"


class AuthzContext:
    """What ``on_check`` knows beyond the request: the gRPC call it came on.

    ``grpc_context`` is the `grpc.aio.ServicerContext` (None in `calloutkit.testing`); its
    methods (``invocation_metadata()``, ``peer()``, ``time_remaining()``, ...) are reachable
    on the context itself. ``abort`` ends the call with a gRPC status, after which Envoy
    applies its own ``failure_mode_allow`` / ``status_on_error``.
    """

    __slots__ = ("_grpc",)

    def __init__(self, grpc_context: Any) -> None:
        self._grpc = grpc_context

    @property
    def grpc_context(self) -> Any:
        """The underlying `grpc.aio.ServicerContext` (None in `calloutkit.testing`)."""
        return self._grpc

    def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        """End the call with a gRPC status (raises; ``await`` is not needed)."""
        raise StreamAbort(code, details)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grpc, name)


class AuthzServer(BaseServer):
    """An Envoy ext_authz server: override ``on_check``.

    ``on_check(request, context)`` receives an `AuthzRequest` (typed attributes; the raw
    `CheckRequest` is ``request.raw``) and an `AuthzContext`, may be ``def`` (run in the
    thread pool) or ``async def``, and returns ``None`` (allow, unchanged), `allow_request`
    (...), `deny_request` (...) or any `CheckResponse`.

    ``error_policy`` says what a raising callback (or one returning something else) answers;
    the traceback is logged, the exception text never reaches Envoy nor the client:

    - ``fail_closed`` (default): deny with ``error_status`` (403 unless given) and the body
      ``authorization check failed``.
    - ``continue``: allow the request unchanged.
    - ``abort``: end the call with gRPC INTERNAL; Envoy then applies ``failure_mode_allow``
      or answers ``status_on_error`` (403 by default).

    Constructor options are those of every calloutkit server (``plaintext_address``,
    ``health_check_port``, ``cert_chain_path``, ``workers``, ...).

    Example::

        from calloutkit import AuthzServer, allow_request, deny_request

        class Server(AuthzServer):
            def on_check(self, request, context):
                if request.headers.get("x-api-key") != "let-me-in":
                    return deny_request(401, "unknown API key\\n")
                return allow_request(headers_to_set=[("x-authenticated", "yes")])

        if __name__ == "__main__":
            Server().run()
    """

    protocol = "ext_authz"

    #: Hand ``on_check`` the `CheckRequest` itself rather than an `AuthzRequest` (the
    #: documented callout API's ``CalloutServerAuth`` does).
    pass_raw_request: bool = False

    def __init__(self, *args: Any, error_policy: ErrorPolicy | str = ErrorPolicy.FAIL_CLOSED,
                 error_status: int = 403, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.error_policy = parse_error_policy(error_policy)
        try:
            self._failed: bytes = deny_request(error_status, _GENERIC_BODY).SerializeToString()
        except CalloutError:
            raise ConfigError(f"error_status: {error_status!r} is not an HTTP status "
                              "(200-599)") from None
        self._on_check = self._overridden("on_check", AuthzServer)
        self._malformed = MalformedInput(logger,
                                         "authz server: the request is not a CheckRequest")

    def on_check(self, request: AuthzRequest, context: AuthzContext) -> Any:
        """Decide on one request. Return None (allow), `allow_request` (...),
        `deny_request` (...) or a `CheckResponse`. By default every request is allowed."""
        return None

    # -- gRPC ----------------------------------------------------------------------------

    def _handlers(self) -> Handlers:
        # Raw bytes in and out: a malformed message is INVALID_ARGUMENT with a fixed text and
        # a rate-limited log line rather than grpc's exception text and traceback, and the fixed
        # answers (allow, the error policy's deny) are serialized once, not per call.
        return [(SERVICE_NAME, {"Check": self._unary_handler(self.check_bytes)})]

    async def check_bytes(self, data: bytes, grpc_context: Any = None) -> bytes:
        """Answer one serialized `CheckRequest` as the ``Check`` RPC does, without the network.

        Raises `StreamAbort` where the RPC would end with a gRPC status.
        """
        try:
            request = apb.CheckRequest.FromString(data)
        except Exception as exc:  # any failure to decode is the peer's
            raise self._malformed("Check: the request is not an "
                                  f"envoy.service.auth.v3.CheckRequest ({describe(exc)})"
                                  ) from None
        if self._server_metrics is not None:
            self._server_metrics.message("check")
        if self._on_check is None:
            return _ALLOW
        view = AuthzRequest(request)
        if _logging.enabled:  # log records name the gateway's request (runtime._logging)
            _logging.begin_stream(view.headers.get(_logging.REQUEST_ID_HEADER)
                                  or _logging.metadata_request_id(grpc_context))
        try:
            result = await self._on_check(request if self.pass_raw_request else view,
                                          AuthzContext(grpc_context))
            if result is None:
                return _ALLOW
            if not isinstance(result, apb.CheckResponse):
                raise CalloutError(f"on_check returned {type(result).__name__}; expected None, "
                                   "allow_request(...), deny_request(...) or a CheckResponse")
            return bytes(result.SerializeToString())
        except StreamAbort:
            raise
        except Exception:
            logger.exception("Check %s: on_check failed; answering with the %s policy",
                             _label(view), self.error_policy.value)
        if self.error_policy is ErrorPolicy.ABORT:
            raise StreamAbort(grpc.StatusCode.INTERNAL, "authz server: check failed")
        if self.error_policy is ErrorPolicy.CONTINUE:
            return _ALLOW
        return self._failed


def _label(view: AuthzRequest) -> str:
    try:
        return f"{view.method} {view.path} from {view.source_address}"
    except Exception:  # the request itself is what is wrong
        return "?"
