"""`PluginCall`: one Dispatch, with the gateway's rules built into its methods.

Tyk reads back only some fields of the Object a plugin returns, and reads them in a fixed way
(see docs/tyk.md). These helpers write exactly those fields:

- request headers through ``set_headers`` / ``delete_headers`` (``headers`` is read-only);
- query parameters through ``add_params`` / ``delete_params`` (not ``url``, not
  ``extended_params``);
- the path through ``url``; the method through ``method``;
- the body through ``raw_body`` (the text ``body`` is never read back);
- answers through ``return_overrides``, where any code > 0 stops the chain and a code >= 400
  renders Tyk's JSON error unless ``override_error`` is set;
- a custom key check's result as ``session`` plus ``metadata["token"]``;
- a Response hook's headers in ``headers`` and ``multivalue_headers``, kept consistent, and its
  body in ``raw_body`` with Content-Length to match.

Everything is a mutation of the received Object, which the server sends back.
"""

from __future__ import annotations

import http
import json as _json
import logging
import re
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any
from urllib.parse import urlsplit

from ..runtime._errors import CalloutError
from ._gourl import URLError, parse_request_uri
from ._headers import TOKEN, Headers, named
from ._proto import Hook, Object, SessionState

logger = logging.getLogger(__name__)

HeaderItems = Mapping[str, str] | Iterable[tuple[str, str]]

_BAD_VALUE = re.compile(r"[\r\n\x00]")


def _check_header(name: str, value: str | None = None) -> None:
    if not isinstance(name, str) or not TOKEN.match(name):
        raise ValueError(f"invalid header name {name!r}")
    if value is not None and (not isinstance(value, str) or _BAD_VALUE.search(value)):
        raise ValueError(f"invalid value for header {name!r}: {value!r} "
                         "(a str without CR, LF or NUL)")


def _items(headers: HeaderItems | None) -> list[tuple[str, str]]:
    if headers is None:
        return []
    pairs = list(headers.items() if isinstance(headers, Mapping) else headers)
    for name, value in pairs:
        _check_header(name, value)
    return pairs


def _drop_keys(mapping: MutableMapping[str, str], is_name: Callable[[str], bool]) -> None:
    for key in [k for k in mapping if is_name(k)]:
        del mapping[key]


def _remove(repeated: Any, matches: Any) -> None:
    kept = [item for item in repeated if not matches(item)]
    if len(kept) != len(repeated):
        del repeated[:]
        repeated.extend(kept)


def _text_of(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return ""


def _as_bytes(value: bytes | bytearray | memoryview | str) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def check_status(status: object, what: str = "HTTP status") -> int:
    """Raise ValueError unless Go's ``WriteHeader`` writes ``status`` as a final answer.

    Go panics below 100 and above 999; a 1xx is sent as an informational response and the
    body that follows goes out under an implicit 200, so the client never sees the 1xx.
    """
    if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status <= 999:
        raise ValueError(f"invalid {what} {status!r}; expected 200-999 (Go's WriteHeader "
                         "panics below 100 and follows a 1xx with an implicit 200)")
    return status


def check_request_uri(url: str) -> None:
    """Raise ValueError unless the gateway's ``url.ParseRequestURI`` accepts ``url``.

    The check is Go's own parser (see ``_gourl``): ``/a b`` and ``/a#b`` pass (Go escapes
    them on the way upstream, ``/a%20b`` and ``/a%23b``), ``/a%zz`` and ``http://[::1/x`` do
    not (the gateway would answer 500 "Middleware error").
    """
    if not isinstance(url, str):
        raise ValueError(f"url must be a str, got {type(url).__name__}")
    if not url:
        raise ValueError("url must not be empty: the gateway answers 500 for an empty url")
    try:
        parse_request_uri(url)
    except URLError as exc:
        raise ValueError(f"url {url!r} is refused by the gateway's url.ParseRequestURI "
                         f"({exc.why})") from None


class PluginRequest:
    """The request side of a `PluginCall`: read what arrived, change what goes upstream.

    Example::

        def pre(call):
            if "x-request-id" not in call.request.headers:
                call.request.set_header("X-Request-Id", new_id())
            call.request.delete_param("debug")
            call.request.url = call.request.url.replace("/v1/", "/v2/", 1)
    """

    __slots__ = ("_request",)

    def __init__(self, request: Any) -> None:
        self._request = request

    @property
    def raw(self) -> Any:
        """The ``coprocess.MiniRequestObject`` itself."""
        return self._request

    @property
    def headers(self) -> Headers:
        """The inbound headers (first value of each, plus ``Host``), case-insensitive."""
        return Headers(self._request.headers.items())

    @property
    def params(self) -> Mapping[str, str]:
        """The inbound query parameters, first value of each."""
        return dict(self._request.params)

    @property
    def method(self) -> str:
        return str(self._request.method)

    @method.setter
    def method(self, value: str) -> None:
        if not isinstance(value, str) or not TOKEN.match(value):
            raise ValueError(f"invalid method {value!r}")
        self._request.method = value

    @property
    def url(self) -> str:
        """Path and query; for Pre hooks it includes the listen path.

        Assigning it rewrites the path (it must stay an absolute path or URI; ``tyk://api/path``
        loops to another API). The gateway takes the query from the parameters, so change those
        with `set_param` / `delete_param`, not here.
        """
        return str(self._request.url)

    @url.setter
    def url(self, value: str) -> None:
        check_request_uri(value)
        if "?" in value and urlsplit(value, allow_fragments=False).query != urlsplit(
                self._request.url, allow_fragments=False).query:
            logger.warning("url %r changes the query string; the gateway rebuilds the query "
                           "from the parameters, so use set_param/delete_param", value)
        self._request.url = value

    @property
    def path(self) -> str:
        """The path part of `url`."""
        return urlsplit(str(self._request.url), allow_fragments=False).path

    @property
    def scheme(self) -> str:
        return str(self._request.scheme)

    @property
    def request_uri(self) -> str:
        return str(self._request.request_uri)

    @property
    def body(self) -> bytes:
        """The body (``raw_body``). Assigning it replaces what the upstream receives; the
        gateway recomputes Content-Length."""
        return bytes(self._request.raw_body)

    @body.setter
    def body(self, value: bytes | str) -> None:
        data = _as_bytes(value)
        self._request.raw_body = data
        if self._request.body:  # keep the text copy honest when the gateway sent one
            self._request.body = _text_of(data)

    @property
    def text(self) -> str:
        """The body decoded as UTF-8 (invalid bytes replaced)."""
        return bytes(self._request.raw_body).decode("utf-8", "replace")

    def json(self) -> Any:
        """The body parsed as JSON; ValueError when it is not JSON."""
        return _json.loads(bytes(self._request.raw_body))

    def set_header(self, name: str, value: str) -> None:
        """Set (replace) a header on the upstream request."""
        _check_header(name, value)
        is_name = named(name)
        _remove(self._request.delete_headers, is_name)
        _drop_keys(self._request.set_headers, is_name)
        self._request.set_headers[name] = value

    def delete_header(self, name: str) -> None:
        """Remove a header from the upstream request."""
        _check_header(name)
        is_name = named(name)
        _drop_keys(self._request.set_headers, is_name)
        if not any(is_name(n) for n in self._request.delete_headers):
            self._request.delete_headers.append(name)

    def set_param(self, name: str, value: str) -> None:
        """Add a query parameter, or replace its value (``add_params``)."""
        if not isinstance(name, str) or not name or not isinstance(value, str):
            raise ValueError(f"invalid query parameter {name!r}={value!r}")
        _remove(self._request.delete_params, lambda n: n == name)
        self._request.add_params[name] = value

    def delete_param(self, name: str) -> None:
        """Remove a query parameter (``delete_params``)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"invalid query parameter name {name!r}")
        self._request.add_params.pop(name, None)
        if name not in self._request.delete_params:
            self._request.delete_params.append(name)


class PluginResponse:
    """The upstream response in a Response hook: status, headers and body, all rewritable.

    ``headers`` (first values) and ``multivalue_headers`` (all values) are kept consistent, so
    every gateway version sends what you set, several ``Set-Cookie`` included; assigning `body`
    keeps Content-Length right.

    Example::

        def response(call):
            data = call.response.json()
            data["served_by"] = "calloutkit"
            call.response.body = json.dumps(data)
            call.response.add_header("Set-Cookie", "seen=1; Path=/")
    """

    __slots__ = ("_response",)

    def __init__(self, response: Any) -> None:
        self._response = response

    @property
    def raw(self) -> Any:
        """The ``coprocess.ResponseObject`` itself."""
        return self._response

    @property
    def status(self) -> int:
        return int(self._response.status_code)

    @status.setter
    def status(self, value: int) -> None:
        self._response.status_code = check_status(value)

    @property
    def headers(self) -> Headers:
        """Every response header, case-insensitive; ``get_all`` gives repeated ones."""
        if self._response.multivalue_headers:
            return Headers((h.key, v) for h in self._response.multivalue_headers
                           for v in h.values)
        return Headers(self._response.headers.items())

    def _seed_multivalue(self) -> None:
        # Gateways before 5.2 send only the map; keep both in step from the first change on.
        if not self._response.multivalue_headers:
            for key, value in self._response.headers.items():
                self._response.multivalue_headers.add(key=key, values=[value])

    def set_header(self, name: str, value: str) -> None:
        """Set a header to exactly this one value."""
        _check_header(name, value)
        self.delete_header(name)
        self._response.headers[name] = value
        self._response.multivalue_headers.add(key=name, values=[value])

    def add_header(self, name: str, value: str) -> None:
        """Add one more value to a header (``Set-Cookie``), keeping the values it has."""
        _check_header(name, value)
        self._seed_multivalue()
        is_name = named(name)
        for entry in self._response.multivalue_headers:
            if is_name(entry.key):
                entry.values.append(value)
                if not any(is_name(k) for k in self._response.headers):
                    self._response.headers[entry.key] = entry.values[0]
                return
        self._response.headers[name] = value
        self._response.multivalue_headers.add(key=name, values=[value])

    def delete_header(self, name: str) -> None:
        """Remove every value of a header."""
        _check_header(name)
        self._seed_multivalue()
        is_name = named(name)
        _drop_keys(self._response.headers, is_name)
        entries = self._response.multivalue_headers
        for index in reversed(range(len(entries))):
            if is_name(entries[index].key):
                del entries[index]

    @property
    def body(self) -> bytes:
        """The body (``raw_body``). Assigning it replaces what the client receives and updates
        Content-Length when the response has one (gateways before 5.8 do not)."""
        return bytes(self._response.raw_body)

    @body.setter
    def body(self, value: bytes | str) -> None:
        data = _as_bytes(value)
        self._response.raw_body = data
        if self._response.body:
            self._response.body = _text_of(data)
        if "content-length" in self.headers:
            self.set_header(self._length_key(), str(len(data)))

    def _length_key(self) -> str:
        is_length = named("Content-Length")
        return next((str(k) for k in self._response.headers if is_length(k)), "Content-Length")

    @property
    def text(self) -> str:
        """The body decoded as UTF-8 (invalid bytes replaced)."""
        return bytes(self._response.raw_body).decode("utf-8", "replace")

    def json(self) -> Any:
        """The body parsed as JSON; ValueError when it is not JSON."""
        return _json.loads(bytes(self._response.raw_body))

    def _replace(self, status: int, body: bytes | str, headers: HeaderItems | None) -> None:
        """Replace status, every header and the body at once (used by reject/respond)."""
        pairs = _items(headers)
        data = _as_bytes(body)
        self.status = status
        self._response.headers.clear()
        del self._response.multivalue_headers[:]
        for name, value in pairs:
            self.add_header(name, value)
        self.set_header("Content-Length", str(len(data)))
        self._response.raw_body = data
        self._response.body = _text_of(data)


def tyk_error_body(message: str) -> str:
    """The body Tyk's default error template renders: ``{"error": "<message>"}``, indented."""
    return '{\n    "error": ' + _json.dumps(message) + "\n}"


class PluginCall:
    """One Dispatch from the gateway: the received Object, and methods that change it the way
    the gateway reads it back. The server returns this same Object when the plugin is done.

    Attributes: ``object`` (the ``coprocess.Object``, the raw protobuf), `hook`, `name`,
    `spec`, `api_id`, `org_id`, `config_data`, `session`, `metadata`, `request`, `response`.

    Example::

        def check_key(call: PluginCall) -> None:
            key = call.request.headers.get("Authorization", "")
            if key not in KEYS:
                call.reject(401, "unknown API key")
                return
            call.authorize(key, rate=100, per=1, quota_max=1000, quota_renewal_rate=3600)
    """

    __slots__ = ("_config_data", "object", "request")

    def __init__(self, obj: Object) -> None:
        self.object = obj
        self.request = PluginRequest(obj.request)
        self._config_data: Any = ...

    @property
    def hook(self) -> Hook:
        """The hook type this call is for."""
        return Hook(self.object.hook_type)

    @property
    def name(self) -> str:
        """The hook's name in the API definition (``hook_name``); empty for an unnamed
        ``auth_check``."""
        return str(self.object.hook_name)

    @property
    def spec(self) -> Mapping[str, str]:
        """``APIID``, ``OrgID``, ``bundle_hash`` and, when enabled, ``config_data``."""
        return dict(self.object.spec)

    @property
    def api_id(self) -> str:
        return str(self.object.spec.get("APIID", ""))

    @property
    def org_id(self) -> str:
        return str(self.object.spec.get("OrgID", ""))

    @property
    def config_data(self) -> Any:
        """The API's ``config_data``, decoded from JSON; None when the gateway sent none."""
        if self._config_data is ...:
            raw = self.object.spec.get("config_data")
            self._config_data = None if not raw else _json.loads(raw)
        return self._config_data

    @property
    def session(self) -> Any:
        """The key's ``SessionState`` (Post, PostKeyAuth, Response hooks), or None."""
        return self.object.session if self.object.HasField("session") else None

    @property
    def metadata(self) -> Any:
        """``Object.metadata``: the session metadata in Post/PostKeyAuth hooks (mutable)."""
        return self.object.metadata

    @property
    def response(self) -> PluginResponse:
        """The upstream response; only Response hooks have one (CalloutError otherwise)."""
        if not self.object.HasField("response"):
            raise CalloutError(f"this {self.hook.tyk_name} call carries no response; only "
                               "Response hooks do")
        return PluginResponse(self.object.response)

    @property
    def short_circuits(self) -> bool:
        """True when the gateway will answer the client from ``return_overrides`` now."""
        return bool(self.object.request.return_overrides.response_code > 0)

    def reject(self, status: int, message: str | None = None, *,
               headers: HeaderItems | None = None) -> None:
        """Refuse the request with Tyk's JSON error: ``{"error": message}`` and ``status``.

        ``status`` must be >= 400. The gateway also fires an AuthFailure event, from any hook.
        In a Response hook (where ``return_overrides`` is ignored) the response itself is
        replaced by the same JSON error.
        """
        if not isinstance(status, int) or not 400 <= status <= 599:
            raise ValueError(f"reject() needs a status of 400-599, got {status!r}; use "
                             "respond() for other answers")
        text = message if message is not None else _reason(status)
        pairs = _items(headers)
        if self.hook is Hook.RESPONSE and self.object.HasField("response"):
            self.response._replace(status, tyk_error_body(text),
                                  [("Content-Type", "application/json"), *pairs])
            return
        overrides = self.object.request.return_overrides
        overrides.Clear()
        overrides.response_code = status
        overrides.response_error = text
        overrides.headers.update(dict(pairs))

    def respond(self, status: int, body: bytes | str = b"", *, json: Any = ...,
                headers: HeaderItems | None = None) -> None:
        """Answer the client directly with exactly this status, body and headers; the upstream
        is not called. ``json=`` serialises a value and sets Content-Type.

        The gateway carries this body as text: bytes must be UTF-8. A 200 here is an answer,
        not "carry on": to carry on, just return.
        """
        check_status(status)
        pairs = _items(headers)
        if json is not ...:
            if body:
                raise ValueError("give body or json, not both")
            body = _json.dumps(json)
            if "Content-Type" not in Headers(pairs):
                pairs.append(("Content-Type", "application/json"))
        data = _as_bytes(body)
        if self.hook is Hook.RESPONSE and self.object.HasField("response"):
            self.response._replace(status, data, pairs)
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("respond() body must be UTF-8: return_overrides carries text "
                             "only") from None
        overrides = self.object.request.return_overrides
        overrides.Clear()
        overrides.response_code = status
        overrides.response_body = text
        # Without override_error a code >= 400 would render the JSON error template instead.
        overrides.override_error = status >= 400
        overrides.headers.update(dict(pairs))

    def authorize(self, token: str, session: Any = None, **fields: Any) -> Any:
        """Accept the key: give the gateway the session to store and the token it requires.

        ``token`` identifies the key (the gateway answers 403 without one); ``session`` is a
        ``SessionState`` to start from; ``fields`` set ``SessionState`` fields by name
        (``rate``, ``per``, ``quota_max``, ``quota_renewal_rate``, ``expires``,
        ``id_extractor_deadline``, ``metadata``, ``apply_policies``, ...). Any earlier
        `reject` is undone. Returns the session, which can still be changed.
        """
        if not isinstance(token, str) or not token:
            raise ValueError("authorize() needs a non-empty token: the gateway answers 403 "
                             "without metadata['token']")
        if self.hook is not Hook.CUSTOM_KEY_CHECK:
            logger.warning("authorize() in a %s hook: the gateway stores sessions only from "
                           "CustomKeyCheck (auth_check) plugins", self.hook.tyk_name)
        built = SessionState(**fields)  # unknown field names raise ValueError here
        target = self.object.session
        if session is not None:
            target.CopyFrom(session)
        elif not self.object.HasField("session"):
            target.SetInParent()
        for name in fields:
            target.ClearField(name)
        target.MergeFrom(built)
        self.object.metadata["token"] = token
        overrides = self.object.request.return_overrides
        overrides.Clear()
        overrides.response_code = -1
        return target


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"
