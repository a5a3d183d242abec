"""`TykPluginServer`: the ``coprocess.Dispatcher`` service Tyk Gateway calls for gRPC plugins.

The gateway makes one unary ``Dispatch(Object) -> Object`` call per configured hook and reads
the returned Object without nil checks, so the server always answers with the Object it
received: changed by the plugin, or unchanged (byte for byte) when nothing matched or changed.
``DispatchEvent(Event) -> EventReply`` delivers events; the gateway ignores the reply.

Per call: parse the bytes, find the plugin by ``(hook_type, hook_name)`` then by name alone,
check the Object is one the gateway could have sent, run the plugin (sync in the thread pool,
``async`` on the loop), check it kept the invariants, serialise. Anything that goes wrong is
logged and answered according to the error policy.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc

from ..runtime import _logging
from ..runtime._config import (
    DEFAULT_CERT_CHAIN_PATH,
    DEFAULT_PRIVATE_KEY_PATH,
    UNSET,
    merge_environment,
)
from ..runtime._errors import (
    CalloutError,
    ConfigError,
    ErrorPolicy,
    StreamAbort,
    parse_error_policy,
)
from ..runtime._invoke import Invoker
from ..runtime._malformed import MalformedInput, RateLimitedLog, describe
from ..runtime._middleware import CallInfo, Describe
from ..runtime._server import BaseServer, Handlers
from ._call import PluginCall, PluginResponse, check_request_uri, check_status
from ._events import EventHandler, GatewayEvent
from ._headers import named
from ._proto import SERVICE_NAME, Event, EventReply, Hook, Object, without_text_bodies

logger = logging.getLogger(__name__)

PluginFunc = Callable[[PluginCall], Any]

_GENERIC_ERROR = '{"error": "internal error in plugin"}'
_EMPTY_REPLY = bytes(EventReply().SerializeToString())
_HOOK_VALUES = frozenset(hook.value for hook in Hook)
_is_request_id = named(_logging.REQUEST_ID_HEADER)
_WARN_LIMIT = 1000  # distinct unmatched hooks remembered; beyond that, debug only
# Distinct unmatched hooks with a warning line each; past that (a peer sending made-up hooks)
# at most one line a minute.
_WARN_EACH = 20


@dataclasses.dataclass(frozen=True)
class Plugin:
    """Run ``func`` for Dispatch calls whose ``hook_name`` is ``name``.

    ``name`` is the hook's ``name`` in the API definition (``functionName`` in Tyk OAS; ``""``
    for an unnamed ``auth_check``). ``hook`` restricts the plugin to one hook type (`Hook`,
    its number, or a name such as ``"pre"`` or ``"auth_check"``); a plugin restricted to the
    call's type wins over one registered for the name alone. ``func(call)`` receives a
    `PluginCall`, changes ``call.object`` through it, and returns None; it may be ``def``
    (run in the thread pool) or ``async def``, a plain function or a method of the server.

    Example::

        class Server(TykPluginServer):
            plugins = [
                Plugin("MyPreRequestPlugin", add_headers, hook=Hook.PRE),
                Plugin("MyAuthCheck", check_key, hook="auth_check"),
            ]
    """

    name: str
    func: PluginFunc
    hook: Hook | int | str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise ConfigError(f"Plugin name must be a str, got {self.name!r}")
        if not callable(self.func):
            raise ConfigError(f"Plugin {self.name!r}: {self.func!r} is not callable")
        if self.hook is not None:
            try:
                object.__setattr__(self, "hook", Hook.parse(self.hook))
            except ValueError as exc:
                raise ConfigError(f"Plugin {self.name!r}: {exc}") from None


class _Outcome(enum.Enum):
    BAD_INPUT = "bad input"
    FAILED = "plugin failed"


class TykPluginServer(BaseServer):
    """A Tyk gRPC plugin server: list your plugins and event handlers, and run it.

    Serves ``coprocess.Dispatcher`` over plaintext h2c (the only transport Tyk speaks; TLS is
    served only when a certificate is configured), with gRPC health, HTTP health, reflection
    (on by default, so ``grpcurl list`` works), graceful drain and the ``calloutkit serve``
    command line. Point the gateway at it with ``coprocess_grpc_server: "tcp://HOST:8080"``.

    ``plugins`` and ``events`` come from the class attributes and from the constructor
    arguments of the same names. ``error_policy`` (an `ErrorPolicy` or its value) says what a
    failing plugin or a malformed call answers:

    - ``fail_closed`` (default): a 500 with ``{"error": "internal error in plugin"}``, sent as
      a raw ``return_overrides`` answer (the upstream is not called; no AuthFailure event); in
      a Response hook, the response is replaced by that 500.
    - ``continue``: the Object exactly as received (an auth check then fails with the
      gateway's 403, since no session was set).
    - ``abort``: a gRPC error (INTERNAL, or INVALID_ARGUMENT for malformed input); the gateway
      answers 500 "Middleware error" (403 for CustomKeyCheck).

    The traceback is logged; the exception text never reaches the gateway. An Object for a
    hook no plugin is registered for goes back unchanged, with a warning.

    Example::

        from calloutkit.tyk import Hook, Plugin, PluginCall, TykPluginServer

        def add_header(call: PluginCall) -> None:
            call.request.set_header("X-Plugin", "calloutkit")

        class Server(TykPluginServer):
            plugins = [Plugin("MyPreRequestPlugin", add_header, hook=Hook.PRE)]

        if __name__ == "__main__":
            Server().run()
    """

    protocol = "tyk"

    default_reflection = True
    #: The plugins every instance serves (`Plugin` entries).
    plugins: Sequence[Plugin] = ()
    #: The event handlers every instance serves (`EventHandler` entries).
    events: Sequence[EventHandler] = ()

    def __init__(self, *args: Any, plugins: Iterable[Plugin] = (),
                 events: Iterable[EventHandler] = (),
                 error_policy: ErrorPolicy | str = ErrorPolicy.FAIL_CLOSED,
                 **kwargs: Any) -> None:
        super().__init__(*args, **_plaintext_unless_certificate(args, kwargs))
        self.error_policy = parse_error_policy(error_policy)
        self._plugins: dict[tuple[Hook | None, str], tuple[Plugin, Invoker]] = {}
        for plugin in [*type(self).plugins, *plugins]:
            if not isinstance(plugin, Plugin):
                raise ConfigError(f"plugins: expected Plugin(...), got {plugin!r}")
            hook = None if plugin.hook is None else Hook.parse(plugin.hook)
            key = (hook, plugin.name)
            if key in self._plugins:
                where = f" for {hook.name}" if hook is not None else ""
                raise ConfigError(f"plugins: {plugin.name!r}{where} is registered twice")
            self._plugins[key] = (plugin, self.invoker(self._as_method(plugin.func),
                                                       describe=_describe_plugin(plugin.name)))
        self._event_handlers: list[tuple[EventHandler, Invoker]] = []
        for handler in [*type(self).events, *events]:
            if not isinstance(handler, EventHandler):
                raise ConfigError(f"events: expected EventHandler(...), got {handler!r}")
            if not callable(handler.func):
                raise ConfigError(f"events: {handler.func!r} is not callable")
            self._event_handlers.append((handler, self.invoker(
                self._as_method(handler.func), "event")))
        self._warned: set[tuple[str, ...]] = set()
        self._malformed_object = MalformedInput(
            logger, "plugin server: the request is not a coprocess.Object")
        self._malformed_event = MalformedInput(logger, "plugin server: malformed event")
        self._bad_object = RateLimitedLog(logger)
        self._unmatched = RateLimitedLog(logger, logging.WARNING)

    def _as_method(self, func: Callable[..., Any]) -> Callable[..., Any]:
        # A function written in the class body (`plugins = [Plugin("x", check)]`) is a method.
        name = getattr(func, "__name__", None)
        if inspect.isfunction(func) and name is not None and any(
                vars(klass).get(name) is func for klass in type(self).__mro__):
            return func.__get__(self, type(self))  # type: ignore[no-any-return]
        return func

    # -- gRPC ----------------------------------------------------------------------------

    def _handlers(self) -> Handlers:
        # No (de)serialisers: the handlers see raw bytes, so a malformed message is
        # INVALID_ARGUMENT with a fixed text and a rate-limited log line (not grpc's exception
        # text and traceback), and an Object nobody changed goes back exactly as it came.
        return [(SERVICE_NAME, {
            "Dispatch": self._unary_handler(self._dispatch_rpc),
            "DispatchEvent": self._unary_handler(self._event_rpc),
        })]

    async def _dispatch_rpc(self, data: bytes, context: Any) -> bytes:
        return await self.dispatch_bytes(data)

    async def _event_rpc(self, data: bytes, context: Any) -> bytes:
        return await self.dispatch_event_bytes(data)

    # -- Dispatch --------------------------------------------------------------------------

    async def dispatch_bytes(self, data: bytes) -> bytes:
        """Answer one serialised Object as the ``Dispatch`` RPC does, without the network.

        The answer leaves out the text ``body`` copies: the gateway reads only ``raw_body``.
        Raises `StreamAbort` where the RPC would end with a gRPC status.
        """
        return without_text_bodies(await self._dispatch(data))

    async def _dispatch(self, data: bytes) -> bytes:
        try:
            obj = Object.FromString(data)
        except Exception as exc:  # any failure to decode is the peer's
            # Whatever the policy, there is no Object to answer with.
            raise self._malformed_object("Dispatch: the request is not a coprocess.Object "
                                         f"({describe(exc)})") from None
        if _logging.enabled:  # log records name the gateway's request (runtime._logging)
            _logging.begin_stream(next((value for name, value in obj.request.headers.items()
                                        if _is_request_id(name)), None))
        if self._server_metrics is not None:
            self._server_metrics.message(Hook(obj.hook_type).name.lower()
                                  if obj.hook_type in _HOOK_VALUES else "unknown")
        label = _label(obj)
        key = (str(obj.hook_type), str(obj.hook_name))
        if obj.hook_type not in _HOOK_VALUES:
            self._warn_once(key, f"Dispatch {label}: hook type {obj.hook_type} is not one "
                                 "calloutkit knows; returning the Object unchanged")
            return data
        hook = Hook(obj.hook_type)
        entry = self._plugins.get((hook, obj.hook_name)) or self._plugins.get(
            (None, obj.hook_name))
        if entry is None:
            self._warn_once(key, f"Dispatch {label}: no plugin registered for this hook; "
                                 "returning the Object unchanged")
            return data
        problem = _malformed(obj, hook)
        if problem:
            self._bad_object(f"Dispatch {label}: {problem}; answering with the "
                             f"{self.error_policy.value} policy")
            return self._failure(data, _Outcome.BAD_INPUT)
        pristine = Object.FromString(data)
        plugin, invoker = entry
        started = time.perf_counter()
        try:
            result = await invoker(PluginCall(obj))
            if result is not None and result is not obj:
                raise CalloutError(_wrong_return(result))
            _check_returned(obj, pristine, hook)
        except Exception:
            logger.exception("Dispatch %s: plugin %s failed; answering with the %s policy",
                             label, _func_name(plugin.func), self.error_policy.value)
            return self._failure(data, _Outcome.FAILED)
        logger.debug("Dispatch %s: %.2f ms", label, (time.perf_counter() - started) * 1000)
        if obj == pristine:
            return data  # unchanged: the exact bytes received, map order and unknown fields
        return bytes(obj.SerializeToString())

    def _failure(self, data: bytes, outcome: _Outcome) -> bytes:
        policy = self.error_policy
        if policy is ErrorPolicy.ABORT:
            code = (grpc.StatusCode.INVALID_ARGUMENT if outcome is _Outcome.BAD_INPUT
                    else grpc.StatusCode.INTERNAL)
            raise StreamAbort(code, f"plugin server: {outcome.value}")
        if policy is ErrorPolicy.CONTINUE:
            return data
        failed = Object.FromString(data)  # drop whatever the plugin changed before failing
        if failed.hook_type == Hook.RESPONSE:
            PluginResponse(failed.response)._replace(
                500, _GENERIC_ERROR, [("Content-Type", "application/json")])
        else:
            overrides = failed.request.return_overrides
            overrides.Clear()
            # A raw answer rather than the error template: the template path would also fire
            # an AuthFailure event and log "Attempted access with invalid key".
            overrides.response_code = 500
            overrides.override_error = True
            overrides.response_body = _GENERIC_ERROR
            overrides.headers["Content-Type"] = "application/json"
        return bytes(failed.SerializeToString())

    def _warn_once(self, key: tuple[str, ...], message: str) -> None:
        if key in self._warned:
            logger.debug(message)
            return
        if len(self._warned) < _WARN_LIMIT:
            self._warned.add(key)
        if len(self._warned) <= _WARN_EACH:
            logger.warning(message)
        else:
            self._unmatched(message)

    # -- DispatchEvent ---------------------------------------------------------------------

    async def dispatch_event_bytes(self, data: bytes) -> bytes:
        """Answer one serialised Event as the ``DispatchEvent`` RPC does, without the network.

        Every matching `EventHandler` runs, in order. Raises `StreamAbort` where the RPC would
        end with a gRPC status (``fail_closed`` and ``abort``: a malformed event or a failing
        handler is reported to the gateway, which logs it).
        """
        # Any failure to decode (protobuf's, json's, a RecursionError from deep nesting) is
        # the peer's.
        try:
            payload = Event.FromString(data).payload
        except Exception as exc:
            return self._bad_event("DispatchEvent: the request is not a coprocess.Event "
                                   f"({describe(exc)})")
        try:
            event = GatewayEvent.decode(payload)
        except CalloutError as exc:
            return self._bad_event(f"DispatchEvent: {exc}: {_preview(payload)!r}")
        except Exception as exc:
            return self._bad_event(f"DispatchEvent: event payload does not decode "
                                   f"({describe(exc)}): {_preview(payload)!r}")
        if self._server_metrics is not None:
            self._server_metrics.message("event")
        handlers = [(h, invoker) for h, invoker in self._event_handlers if h.matches(event)]
        if not handlers:
            self._warn_once(("event", event.type, event.handler_name),
                            f"DispatchEvent {event.type or '?'} (handler "
                            f"{event.handler_name!r}): no event handler matches")
            return _EMPTY_REPLY
        failed = False
        for handler, invoker in handlers:
            try:
                await invoker(event)
            except Exception:
                failed = True
                logger.exception("DispatchEvent %s: handler %s failed", event.type,
                                 _func_name(handler.func))
        if failed:
            return self._event_failure(grpc.StatusCode.INTERNAL, "event handler failed")
        return _EMPTY_REPLY

    def _bad_event(self, problem: str) -> bytes:
        abort = self._malformed_event(problem)
        if self.error_policy is ErrorPolicy.CONTINUE:
            return _EMPTY_REPLY
        raise abort

    def _event_failure(self, code: grpc.StatusCode, details: str) -> bytes:
        if self.error_policy is ErrorPolicy.CONTINUE:
            return _EMPTY_REPLY
        raise StreamAbort(code, f"plugin server: {details}")


def _describe_plugin(name: str) -> Describe:
    def describe(args: tuple[Any, ...]) -> CallInfo:
        call: PluginCall = args[0]
        return CallInfo("tyk", call.hook.name.lower(), name, call.object, call, args)

    return describe


def _plaintext_unless_certificate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Turn TLS off unless a certificate was asked for: Tyk only dials plaintext h2c."""
    bound = inspect.signature(BaseServer.__init__).bind_partial(None, *args, **kwargs)
    given = bound.arguments
    paths = merge_environment({
        "cert_chain_path": given.get("cert_chain_path", UNSET),
        "private_key_path": given.get("private_key_path", UNSET)},
        given.get("environ"))
    explicit = (given.get("cert_chain") is not None or given.get("private_key") is not None
                or paths.get("cert_chain_path") not in (None, DEFAULT_CERT_CHAIN_PATH)
                or paths.get("private_key_path") not in (None, DEFAULT_PRIVATE_KEY_PATH))
    if explicit:
        return kwargs
    return {**kwargs, "disable_tls": True}


def _label(obj: Any) -> str:
    hook = (Hook(obj.hook_type).tyk_name if obj.hook_type in _HOOK_VALUES
            else str(obj.hook_type))
    api = obj.spec.get("APIID")
    return f"{hook} {obj.hook_name!r}" + (f" (API {api})" if api else "")


def _malformed(obj: Any, hook: Hook) -> str:
    """Why the gateway could not have sent this Object, or ""."""
    if not obj.HasField("request"):
        return "the Object has no request"
    if not obj.request.HasField("return_overrides"):
        return "the Object's request has no return_overrides"
    if hook is Hook.RESPONSE and not obj.HasField("response"):
        return "a Response hook Object without a response"
    return ""


def _check_returned(obj: Any, pristine: Any, hook: Hook) -> None:
    """Raise CalloutError when the gateway could not apply the returned Object."""
    problem = _malformed(obj, hook)
    if problem:
        raise CalloutError(f"the plugin removed a field the gateway reads: {problem}")
    if obj.request.url != pristine.request.url:
        try:
            check_request_uri(obj.request.url)
        except ValueError as exc:
            raise CalloutError(str(exc)) from None
    # Only a status the plugin set: one the gateway sent is the gateway's business.
    status, code = obj.response.status_code, obj.request.return_overrides.response_code
    try:
        if hook is Hook.RESPONSE and status != pristine.response.status_code:
            check_status(status, "response status")
        elif code > 0 and code != pristine.request.return_overrides.response_code:
            check_status(code, "return_overrides.response_code")
    except ValueError as exc:
        raise CalloutError(str(exc)) from None


def _wrong_return(result: Any) -> str:
    if isinstance(result, Object):
        return ("the plugin returned a different Object; the gateway needs the one it sent: "
                "change call.object (or call its helpers) and return None")
    return (f"the plugin returned {type(result).__name__}; plugins change call.object and "
            "return None")


def _func_name(func: Callable[..., Any]) -> str:
    return str(getattr(func, "__qualname__", None) or repr(func))


def _preview(data: str, limit: int = 120) -> str:
    return data if len(data) <= limit else data[:limit] + "..."
