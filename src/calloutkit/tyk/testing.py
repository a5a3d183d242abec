"""Test Tyk plugins without a Tyk Gateway: a model of the gateway's coprocess rules.

`Gateway` builds the Object Tyk Gateway (v5.14) would send for a hook, calls a plugin server
(over real gRPC, or in process with no sockets), and applies the returned Object the way the
gateway does: which fields it reads, in which order, what short-circuits, what becomes a JSON
error, what a custom key check must return, how a Response hook's headers and body are rebuilt.
It models the coprocess middleware only (no rate limits, quotas, policies or analytics).

Where it follows Go rather than Python: the returned ``url`` is parsed with a port of Go's
``url.ParseRequestURI`` and goes upstream escaped as Go escapes it (``/a b`` -> ``/a%20b``);
the query is rebuilt with ``url.Values.Encode`` (keys sorted, values in order, pairs holding a
``;`` dropped) when the parameters changed; a target is read with ``url.Parse`` as the gateway
reads ``coprocess_grpc_server`` (``127.0.0.1:PORT`` is refused: write ``tcp://127.0.0.1:PORT``);
replies over ``grpc_recv_max_size`` (4 MiB by default) fail as they do in the gateway. Errors
use Tyk's XML template when the request's Content-Type is XML, and a plugin's Content-Type is
replaced, not doubled.

What it cannot follow: the JSON error message is escaped with ``json.dumps``, where Tyk uses
Go's ``JSEscapeString`` (``<`` becomes ``\u003C``); headers are rebuilt in list order, where Go
keeps a map; custom error templates (``error_<code>.json``) and ``hide_generator_header`` are
not modelled; Go 1.26's stricter colons in http(s) hosts (Tyk 5.15) are not applied.

- `request_object` and `response_object` build Objects as the gateway fills them;
- `event_payload` builds a ``DispatchEvent`` payload as the gateway does;
- `sync_multivalue_headers` is the gateway's Response-hook header sync.

Example::

    server = MyPlugins(plaintext_address=("127.0.0.1", 0), combined_health_check=True)
    await server.start()
    async with Gateway(f"tcp://127.0.0.1:{server.plaintext_port}", api_id="1") as gateway:
        outcome = await gateway.request_hook(Hook.PRE, "MyPreRequestPlugin",
                                             HttpRequest("GET", "/api/pets?limit=1"))
        assert outcome.request.header("X-Plugin") == "calloutkit"
    await server.stop()
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import grpc

from ..runtime._errors import StreamAbort
from ._call import tyk_error_body
from ._gourl import URLError, encode_query, parse_query, parse_request_uri, parse_url, query_pairs
from ._headers import Headers, canonical_header_key, named
from ._proto import DISPATCH_EVENT_METHOD, DISPATCH_METHOD, Event, EventReply, Hook, Object
from ._server import TykPluginServer

__all__ = [
    "Gateway",
    "HttpRequest",
    "HttpResponse",
    "Outcome",
    "canonical_header_key",
    "event_payload",
    "gateway_target",
    "request_object",
    "response_object",
    "sync_multivalue_headers",
]

EMPTY_BUNDLE_HASH = hashlib.md5(b"").hexdigest()  # what the gateway sends
#: grpc-go's default receive limit, which the gateway keeps unless grpc_recv_max_size is set.
DEFAULT_RECV_MAX_SIZE = 4 * 1024 * 1024
_XML_TYPES = ("application/xml", "text/xml", "application/soap+xml")


def _first_values(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in pairs:
        out.setdefault(canonical_header_key(key), value)
    return out


def _without(pairs: Iterable[tuple[str, str]], name: str) -> list[tuple[str, str]]:
    is_name = named(name)
    return [(k, v) for k, v in pairs if not is_name(k)]


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return ""


class _HeaderLookup:
    """Case-insensitive lookups in ``headers``, a list of (name, value) pairs."""

    headers: list[tuple[str, str]]

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first value of a header (case-insensitive)."""
        return Headers(self.headers).get(name, default)

    def header_values(self, name: str) -> list[str]:
        """Every value of a header, in order (case-insensitive)."""
        return Headers(self.headers).get_all(name)


@dataclasses.dataclass
class HttpRequest(_HeaderLookup):
    """An HTTP request as the gateway holds it: ``url`` is path and query, listen path
    included. After a hook, the request the chain goes on with (what the upstream gets)."""

    method: str = "GET"
    url: str = "/"
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    body: bytes = b""
    scheme: str = "http"
    host: str = "localhost:8080"

    @property
    def path(self) -> str:
        return urlsplit(self.url, allow_fragments=False).path

    @property
    def raw_query(self) -> str:
        return self.url.partition("?")[2]

    @property
    def query(self) -> list[tuple[str, str]]:
        """The query pairs Go's ``URL.Query`` keeps (a pair holding ``;`` is dropped)."""
        return query_pairs(self.raw_query)


@dataclasses.dataclass
class HttpResponse(_HeaderLookup):
    """An HTTP response: what the upstream sent, or what the client gets."""

    status: int = 200
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    body: bytes = b""

    def json(self) -> Any:
        return json.loads(self.body)


@dataclasses.dataclass
class Outcome:
    """What the gateway did with one hook's reply.

    ``response`` is set when the client got an answer here: the chain stopped (a request hook)
    or the rebuilt response (a Response hook). ``request`` is the request as the chain goes on.
    ``returned`` is the Object the plugin sent back (None after a gRPC error or a cache hit).
    For a custom key check, ``session`` and ``key`` are what the gateway stored.
    """

    request: HttpRequest
    response: HttpResponse | None = None
    returned: Any = None
    events: list[str] = dataclasses.field(default_factory=list)
    session: Any = None
    key: str | None = None
    dispatched: bool = True
    error: str | None = None

    @property
    def stopped(self) -> bool:
        """True when the client was answered without reaching the upstream."""
        return self.response is not None


def request_object(hook: Hook | int | str, name: str, request: HttpRequest, *,
                   api_id: str = "", org_id: str = "", config_data: Any = None,
                   session: Any = None, raw_body_only: bool = False) -> Any:
    """The Object the gateway sends for a request hook (and the request part of any hook).

    >>> obj = request_object("pre", "MyPre", HttpRequest("GET", "/pets?limit=2"))
    >>> obj.request.return_overrides.response_code, dict(obj.request.params)
    (-1, {'limit': '2'})
    """
    hook = Hook.parse(hook)
    obj = Object(hook_type=hook.tyk_name, hook_name=name)
    req = obj.request
    req.headers.update(_first_values(request.headers))
    req.headers["Host"] = request.host
    req.url = request.url
    req.request_uri = request.url
    req.method = request.method
    req.scheme = request.scheme
    for key, value in request.query:
        req.params.setdefault(key, value)
    req.return_overrides.response_code = -1
    req.raw_body = request.body
    if not raw_body_only:
        req.body = _text(request.body)
    obj.spec.update({"OrgID": org_id, "APIID": api_id, "bundle_hash": EMPTY_BUNDLE_HASH})
    if config_data:  # the gateway sends config_data only when it is not empty
        obj.spec["config_data"] = json.dumps(config_data)
    if hook in (Hook.POST, Hook.POST_KEY_AUTH, Hook.RESPONSE) and session is not None:
        obj.session.CopyFrom(session)
        obj.metadata.update(session.metadata)
    if hook is Hook.RESPONSE and session is None:
        # Keyless APIs: an empty session whose three submessages are present.
        for field in ("basic_auth_data", "jwt_data", "monitor"):
            getattr(obj.session, field).SetInParent()
    return obj


def response_object(name: str, request: HttpRequest, response: HttpResponse, *,
                    upstream: str = "http://upstream.example", **options: Any) -> Any:
    """The Object the gateway sends for a Response hook: ``request.url`` is the full upstream
    URL, and ``response`` carries status, headers (first values and all values) and body."""
    obj = request_object(Hook.RESPONSE, name, request, **options)
    obj.request.url = upstream.rstrip("/") + request.url
    res = obj.response
    res.status_code = response.status
    grouped: dict[str, list[str]] = {}
    for key, value in response.headers:
        grouped.setdefault(canonical_header_key(key), []).append(value)
    for key, values in grouped.items():
        res.headers[key] = values[0]
        res.multivalue_headers.add(key=key, values=values)
    res.raw_body = response.body
    if not options.get("raw_body_only"):
        res.body = _text(response.body)
    return obj


def sync_multivalue_headers(headers: Mapping[str, str],
                            multivalue: Iterable[tuple[str, Sequence[str]]]
                            ) -> list[tuple[str, list[str]]]:
    """The gateway's Response-hook sync (v5.8+), used when ``headers`` changed: a key in both
    gets its first value replaced and keeps the others; a new key gets one value; a key no
    longer in ``headers`` is dropped."""
    out: list[tuple[str, list[str]]] = []
    seen = set()
    for key, values in multivalue:
        if key in headers:
            out.append((key, [headers[key], *list(values)[1:]]))
            seen.add(key)
    out.extend((key, [value]) for key, value in headers.items() if key not in seen)
    return out


def event_payload(event_type: str, meta: Mapping[str, Any] | None = None, *,
                  handler_name: str = "", api_id: str = "", org_id: str = "",
                  when: datetime.datetime | None = None) -> str:
    """A ``DispatchEvent`` payload as the gateway writes it (``TimeStamp`` in Go's format)."""
    when = when or datetime.datetime.now(datetime.UTC)
    fraction = f"{when.microsecond:06d}".rstrip("0")
    stamp = when.strftime("%Y-%m-%d %H:%M:%S") + (f".{fraction}" if fraction else "")
    return json.dumps({
        "message": {"Type": event_type, "Meta": dict(meta or {}),
                    "TimeStamp": f"{stamp} +0000 UTC"},
        "handler_name": handler_name,
        "spec": {"APIID": api_id, "OrgID": org_id},
    })


class _DispatchError(Exception):
    pass


class Gateway:
    """A model of Tyk Gateway's coprocess middleware in front of one plugin server.

    ``target`` is a ``coprocess_grpc_server`` value (``tcp://HOST:PORT``,
    ``unix:///PATH.sock``, ``dns:///HOST:PORT``, ``localhost:PORT``), read as the gateway reads
    it: a value Go's ``url.Parse`` refuses, such as ``127.0.0.1:PORT``, raises ValueError (the
    gateway would start without a plugin server). Or a `TykPluginServer` to call in process.
    ``grpc_recv_max_size`` (default 4 MiB) and ``grpc_send_max_size`` (default 0: no limit)
    are the gateway's message limits; a message over one fails as a gRPC error would.
    ``id_extractor`` names a header whose value keys the custom-auth cache: while a stored
    session's ``id_extractor_deadline`` is in the future, the plugin is not called.

    Example::

        async with Gateway(server) as gateway:   # in process, no sockets
            outcome = await gateway.request_hook("auth_check", "MyAuthCheck",
                                                 HttpRequest(headers=[("Authorization", "k")]))
            assert outcome.key == "k" and not outcome.stopped
    """

    def __init__(self, target: str | TykPluginServer, *, api_id: str = "api",
                 org_id: str = "org", config_data: Any = None, id_extractor: str | None = None,
                 timeout: float = 30.0, grpc_recv_max_size: int = 0,
                 grpc_send_max_size: int = 0) -> None:
        self.api_id, self.org_id, self.config_data = api_id, org_id, config_data
        self.id_extractor = id_extractor
        self.timeout = timeout
        # As the gateway: a limit is applied only when > 0; receive defaults to grpc-go's.
        self.recv_max_size = grpc_recv_max_size if grpc_recv_max_size > 0 else (
            DEFAULT_RECV_MAX_SIZE)
        self.send_max_size = grpc_send_max_size if grpc_send_max_size > 0 else None
        #: Sessions stored by custom key checks, by storage key.
        self.sessions: dict[str, Any] = {}
        self._server: TykPluginServer | None = None
        self._channel: grpc.aio.Channel | None = None
        if isinstance(target, TykPluginServer):
            self._server = target
        else:
            options = [("grpc.max_receive_message_length", self.recv_max_size),
                       ("grpc.max_send_message_length", self.send_max_size or -1)]
            self._channel = grpc.aio.insecure_channel(gateway_target(target), options=options)

    async def __aenter__(self) -> Gateway:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    # -- the wire ----------------------------------------------------------------------------

    async def _call(self, method: str, data: bytes) -> bytes:
        if self._server is not None:
            if self.send_max_size is not None and len(data) > self.send_max_size:
                raise _DispatchError(f"RESOURCE_EXHAUSTED: trying to send message larger than "
                                     f"max ({len(data)} vs. {self.send_max_size})")
            try:
                if method == DISPATCH_METHOD:
                    reply = await self._server.dispatch_bytes(data)
                else:
                    reply = await self._server.dispatch_event_bytes(data)
            except StreamAbort as abort:
                raise _DispatchError(f"{abort.code.name}: {abort.details}") from None
            if len(reply) > self.recv_max_size:
                raise _DispatchError(f"RESOURCE_EXHAUSTED: received message larger than max "
                                     f"({len(reply)} vs. {self.recv_max_size})")
            return reply
        assert self._channel is not None
        call = self._channel.unary_unary(method)
        try:
            return bytes(await call(data, timeout=self.timeout))
        except grpc.aio.AioRpcError as exc:
            raise _DispatchError(f"{exc.code().name}: {exc.details()}") from None

    async def dispatch(self, obj: Any) -> Any:
        """Send one Object; return the Object the server answered. gRPC errors raise."""
        return Object.FromString(await self._call(DISPATCH_METHOD, obj.SerializeToString()))

    async def dispatch_event(self, payload: str | Mapping[str, Any]) -> Any:
        """Send one event (a payload string, or a dict to encode); return the EventReply."""
        text = payload if isinstance(payload, str) else json.dumps(payload)
        data = await self._call(DISPATCH_EVENT_METHOD, Event(payload=text).SerializeToString())
        return EventReply.FromString(data)

    # -- the hooks ---------------------------------------------------------------------------

    async def request_hook(self, hook: Hook | int | str, name: str, request: HttpRequest, *,
                           session: Any = None, raw_body_only: bool = False) -> Outcome:
        """Run one request hook (Pre, Post, PostKeyAuth or CustomKeyCheck) and apply its reply.

        For Post and PostKeyAuth, ``session`` is the key's session (None: keyless API).
        """
        hook = Hook.parse(hook)
        outcome = Outcome(request=dataclasses.replace(request, headers=list(request.headers)))
        cache_key = None
        if hook is Hook.CUSTOM_KEY_CHECK and self.id_extractor is not None:
            extracted = request.header(self.id_extractor)
            if not extracted:
                outcome.response = _tyk_error(request, 400, "Authorization field missing")
                outcome.dispatched = False
                return outcome
            cache_key = self.org_id + hashlib.md5(extracted.encode()).hexdigest()
            cached = self.sessions.get(cache_key)
            if cached is not None and cached.id_extractor_deadline > time.time():
                outcome.session, outcome.key, outcome.dispatched = cached, cache_key, False
                return outcome
        sent = request_object(hook, name, request, api_id=self.api_id, org_id=self.org_id,
                              config_data=self.config_data, session=session,
                              raw_body_only=raw_body_only)
        try:
            returned = await self.dispatch(sent)
        except _DispatchError as exc:
            outcome.error = str(exc)
            outcome.response = (_tyk_error(request, 403, "Key not authorised")
                                if hook is Hook.CUSTOM_KEY_CHECK
                                else _tyk_error(request, 500, "Middleware error"))
            return outcome
        outcome.returned = returned
        self._apply_request(sent, returned, outcome)
        if hook is Hook.CUSTOM_KEY_CHECK and not outcome.stopped:
            self._apply_auth(returned, outcome, cache_key)
        return outcome

    def _apply_request(self, sent: Any, returned: Any, outcome: Outcome) -> None:
        req, upstream = returned.request, outcome.request
        # 1. The body always comes from raw_body; the text body is never read.
        upstream.body = bytes(req.raw_body)
        upstream.headers = _without(upstream.headers, "Content-Length")
        if upstream.body:
            upstream.headers.append(("Content-Length", str(len(upstream.body))))
        # 2. Headers: deletes, then sets (replace).
        for key in req.delete_headers:
            upstream.headers = _without(upstream.headers, key)
        for key, value in req.set_headers.items():
            upstream.headers = _without(upstream.headers, key)
            upstream.headers.append((canonical_header_key(key), value))
        # 3. Query: url.Values of the original query, deletes then sets (Values.Set replaces
        # every value); extended_params is ignored.
        params = parse_query(upstream.raw_query)
        for key in req.delete_params:
            params.pop(key, None)
        for key, value in req.add_params.items():
            params[key] = [value]
        # 4. URL: url.ParseRequestURI of the returned url; its query is replaced by step 3's
        # Values.Encode() when the two differ (reflect.DeepEqual).
        try:
            parsed = parse_request_uri(req.url)
        except URLError as exc:
            outcome.error = str(exc)
            outcome.response = _tyk_error(outcome.request, 500, "Middleware error")
            return
        if parsed.query() != params:
            parsed.raw_query = encode_query(params).encode()
            parsed.force_query = False
        upstream.url = parsed.string()
        # 5. Method.
        upstream.method = req.method
        # 7.-9. return_overrides: response_error wins; >= 400 renders the JSON error template
        # (and fires AuthFailure) unless override_error; any other code > 0 answers raw.
        overrides = req.return_overrides
        body = overrides.response_error or overrides.response_body
        code = overrides.response_code
        if code >= 400 and not overrides.override_error:
            outcome.events.append("AuthFailure")
            outcome.response = _tyk_error(upstream, code, body or "Key not authorised",
                                          list(overrides.headers.items()))
        elif code > 0:
            outcome.response = HttpResponse(code, list(overrides.headers.items()), body.encode())

    def _apply_auth(self, returned: Any, outcome: Outcome, cache_key: str | None) -> None:
        metadata = dict(returned.session.metadata) if returned.HasField("session") else {}
        metadata.update(returned.metadata)
        token = metadata.get("token", "")
        if not returned.HasField("session") or not token:
            outcome.events.append("AuthFailure")
            outcome.response = _tyk_error(outcome.request, 403, "Forbidden")
            return
        session = type(returned.session)()
        session.CopyFrom(returned.session)
        session.metadata.update(returned.metadata)
        session.org_id = self.org_id
        key = cache_key or token
        previous = self.sessions.get(key)
        if previous is not None:
            session.quota_renews = previous.quota_renews
            session.quota_remaining = previous.quota_remaining
        session.key_id = key
        self.sessions[key] = session
        outcome.session, outcome.key = session, key

    async def response_hook(self, name: str, request: HttpRequest, response: HttpResponse, *,
                            session: Any = None, raw_body_only: bool = False) -> Outcome:
        """Run one Response hook on ``response`` and rebuild the response as the gateway does."""
        outcome = Outcome(request=request)
        sent = response_object(name, request, response, api_id=self.api_id,
                               org_id=self.org_id, config_data=self.config_data,
                               session=session, raw_body_only=raw_body_only)
        try:
            returned = await self.dispatch(sent)
        except _DispatchError as exc:
            outcome.error = str(exc)
            outcome.response = _tyk_error(request, 500, "Middleware error")
            return outcome
        outcome.returned = returned
        if not returned.HasField("response"):
            outcome.error = "the returned Object has no response"
            outcome.response = _tyk_error(request, 500, "Middleware error")
            return outcome
        res = returned.response
        multivalue = [(h.key, list(h.values)) for h in res.multivalue_headers]
        if dict(res.headers) != dict(sent.response.headers):
            multivalue = sync_multivalue_headers(dict(res.headers), multivalue)
        headers = _without(((canonical_header_key(k), v) for k, values in multivalue
                            for v in values), "Content-Length")
        headers.append(("Content-Length", str(len(res.raw_body))))
        outcome.response = HttpResponse(res.status_code, headers, bytes(res.raw_body))
        return outcome


def gateway_target(value: str) -> str:
    """The gRPC target the gateway (v5.8.3+) dials for a ``coprocess_grpc_server`` value:
    ``url.Parse`` first (an error means no plugin server), then ``tcp://`` stripped.

    >>> gateway_target("tcp://127.0.0.1:5555")
    '127.0.0.1:5555'
    """
    try:
        parse_url(value)
    except URLError as exc:
        raise ValueError(f"coprocess_grpc_server {value!r}: the gateway's url.Parse refuses "
                         f"it ({exc.why}); write tcp://{value}") from None
    return value.removeprefix("tcp://")


def _tyk_error(request: HttpRequest, status: int, message: str,
               headers: Sequence[tuple[str, str]] = ()) -> HttpResponse:
    """Tyk's error handler: the XML template when the request's Content-Type is XML, else the
    JSON one; its Content-Type replaces any the plugin set (``Header.Set``)."""
    content_type = (request.header("Content-Type") or "").split(";")[0]
    if content_type in _XML_TYPES:
        body = f'<?xml version = "1.0" encoding = "UTF-8"?>\n<error>{message}</error>\n'
    else:
        content_type, body = "application/json", tyk_error_body(message)
    return HttpResponse(status, [*_without(headers, "Content-Type"),
                                 ("Content-Type", content_type), ("X-Generator", "tyk.io")],
                        body.encode())
