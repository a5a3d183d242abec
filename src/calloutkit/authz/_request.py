"""`AuthzRequest`: the attributes of one ext_authz ``CheckRequest`` as plain Python values.

Envoy describes the request being authorized in ``CheckRequest.attributes``: the HTTP request
(method, path, headers, body), the downstream peer (``source``: address, principal and
certificate of a TLS client), the listener (``destination``), the route's
``context_extensions`` and the filter's ``metadata_context``. The view reads them lazily; the
protobuf stays reachable as ``raw`` (and ``attributes``), so code written against the raw
message keeps working.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from typing import Any

from envoy.service.auth.v3 import external_auth_pb2 as apb
from google.protobuf import json_format


class Headers(Mapping[str, str]):
    """Request headers as a read-only mapping with case-insensitive keys.

    Envoy sends header names in lower case, either in ``headers`` (a map of strings, the
    default) or in ``header_map`` (``raw_value`` bytes, with the filter's
    ``encode_raw_headers: true``); both read the same here. Values that repeat arrive joined
    with ``,``.

    >>> h = Headers({"x-user": "ada"})
    >>> h["X-User"], h.get("missing")
    ('ada', None)
    """

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str] | None = None) -> None:
        self._items = {k.lower(): v for k, v in (items or {}).items()}

    def __getitem__(self, key: str) -> str:
        return self._items[key.lower()]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


def _split_port(address: Any) -> tuple[str, int]:
    socket = address.socket_address
    if socket.address:
        return socket.address, int(socket.port_value)
    if address.pipe.path:
        return address.pipe.path, 0
    return "", 0


class AuthzRequest:
    """One authorization check, as typed values; ``raw`` is the `CheckRequest` itself.

    Properties: ``method``, ``path`` (with the query string, as sent), ``host`` (the
    ``:authority``), ``scheme``, ``protocol``, ``headers`` (`Headers`), ``body`` (bytes: only
    with the filter's ``with_request_body``), ``source_address`` / ``source_port`` (the
    downstream client as Envoy sees it), ``destination_address`` / ``destination_port``,
    ``principal`` (the client certificate's URI SAN or subject, with mTLS) and
    ``peer_certificate`` (its PEM, with ``include_peer_certificate: true``), ``sni``,
    ``context_extensions`` (from the route's ``check_settings``) and ``metadata``
    (``metadata_context.filter_metadata`` as dicts).

    Example::

        def on_check(self, request, context):
            if request.headers.get("x-api-key") != "secret":
                return deny_request(401, "missing or wrong API key")
            return allow_request(headers_to_set=[("x-user", "ada")])
    """

    def __init__(self, raw: apb.CheckRequest) -> None:
        self.raw = raw

    @property
    def attributes(self) -> Any:
        """``raw.attributes``, the `AttributeContext` (for code written against the proto)."""
        return self.raw.attributes

    @property
    def _http(self) -> Any:
        return self.raw.attributes.request.http

    @property
    def method(self) -> str:
        """The HTTP method (``GET``, ...)."""
        return str(self._http.method)

    @property
    def path(self) -> str:
        """The ``:path``, query string included."""
        return str(self._http.path)

    @property
    def host(self) -> str:
        """The ``:authority`` (``Host``)."""
        return str(self._http.host)

    @property
    def scheme(self) -> str:
        """``http`` or ``https``, as the downstream connection used."""
        return str(self._http.scheme)

    @property
    def protocol(self) -> str:
        """``HTTP/1.1``, ``HTTP/2``, ..."""
        return str(self._http.protocol)

    @functools.cached_property
    def headers(self) -> Headers:
        """The request headers (pseudo-headers included), case-insensitive."""
        http = self._http
        if http.header_map.headers:
            joined: dict[str, str] = {}
            for header in http.header_map.headers:
                value = header.raw_value.decode("utf-8", "replace") or header.value
                key = header.key.lower()
                joined[key] = f"{joined[key]},{value}" if key in joined else value
            return Headers(joined)
        return Headers(dict(http.headers))

    @property
    def body(self) -> bytes:
        """The request body (``raw_body``, else ``body``); empty unless Envoy sends it."""
        http = self._http
        return bytes(http.raw_body) or http.body.encode()

    @property
    def source_address(self) -> str:
        """The downstream client's IP (or pipe path), as Envoy sees the connection."""
        return _split_port(self.raw.attributes.source.address)[0]

    @property
    def source_port(self) -> int:
        """The downstream client's port."""
        return _split_port(self.raw.attributes.source.address)[1]

    @property
    def destination_address(self) -> str:
        """The address of Envoy's listener that took the request."""
        return _split_port(self.raw.attributes.destination.address)[0]

    @property
    def destination_port(self) -> int:
        """The port of Envoy's listener that took the request."""
        return _split_port(self.raw.attributes.destination.address)[1]

    @property
    def principal(self) -> str:
        """The TLS client certificate's URI SAN or subject; empty without mTLS."""
        return str(self.raw.attributes.source.principal)

    @property
    def peer_certificate(self) -> str:
        """The client certificate (URL-encoded PEM, as Envoy sends it); empty unless the
        filter sets ``include_peer_certificate``."""
        return str(self.raw.attributes.source.certificate)

    @property
    def sni(self) -> str:
        """The TLS server name the client asked for; empty over plaintext."""
        return str(self.raw.attributes.tls_session.sni)

    @property
    def context_extensions(self) -> dict[str, str]:
        """The route's ``check_settings.context_extensions``."""
        return dict(self.raw.attributes.context_extensions)

    @functools.cached_property
    def metadata(self) -> dict[str, dict[str, Any]]:
        """``metadata_context.filter_metadata``: ``{namespace: values}`` as plain data."""
        return {namespace: json_format.MessageToDict(values)
                for namespace, values in
                self.raw.attributes.metadata_context.filter_metadata.items()}

    def __repr__(self) -> str:
        return (f"AuthzRequest({self.method} {self.host}{self.path} from "
                f"{self.source_address}:{self.source_port})")
