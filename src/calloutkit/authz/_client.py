"""`AuthzClient`: ask an `AuthzServer` in process, with no sockets, through the server's own
``Check`` path (the same callback, conversion and error policy as under Envoy)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from envoy.service.auth.v3 import external_auth_pb2 as apb
from google.protobuf import json_format

from ..client._inprocess import StreamEnded, _FakeContext
from ..runtime._errors import StreamAbort
from ._server import AuthzServer


def check_request(method: str = "GET", path: str = "/", *, host: str = "localhost",
                  scheme: str = "http", headers: Mapping[str, str] | None = None,
                  body: bytes | str = b"", source: tuple[str, int] = ("127.0.0.1", 50000),
                  destination: tuple[str, int] = ("127.0.0.1", 10000),
                  principal: str = "", peer_certificate: str = "",
                  context_extensions: Mapping[str, str] | None = None,
                  metadata: Mapping[str, Mapping[str, Any]] | None = None,
                  protocol: str = "HTTP/1.1") -> apb.CheckRequest:
    """A `CheckRequest` as Envoy's ext_authz filter sends it (headers in ``headers``, the
    pseudo-headers among them, the body in ``body`` and ``raw_body``).

    >>> http = check_request("POST", "/orders", headers={"X-Key": "k"}).attributes.request.http
    >>> http.headers["x-key"], http.headers[":method"]
    ('k', 'POST')
    """
    request = apb.CheckRequest()
    attributes = request.attributes
    http = attributes.request.http
    http.method, http.path, http.host, http.scheme, http.protocol = (
        method, path, host, scheme, protocol)
    http.headers.update({":method": method, ":path": path, ":authority": host,
                         ":scheme": scheme})
    http.headers.update({k.lower(): v for k, v in (headers or {}).items()})
    data = body.encode() if isinstance(body, str) else bytes(body)
    if data:
        http.raw_body = data
        http.body = data.decode("utf-8", "replace")
        http.size = len(data)
    for peer, (address, port) in ((attributes.source, source),
                                  (attributes.destination, destination)):
        peer.address.socket_address.address = address
        peer.address.socket_address.port_value = port
    attributes.source.principal = principal
    attributes.source.certificate = peer_certificate
    attributes.context_extensions.update(context_extensions or {})
    for namespace, values in (metadata or {}).items():
        json_format.ParseDict(dict(values), attributes.metadata_context.filter_metadata[namespace])
    return request


class AuthzClient:
    """Test an `AuthzServer` subclass without Envoy or sockets.

    ``check`` takes a `CheckRequest` or the arguments of `check_request`, and returns the
    server's `CheckResponse`; `StreamEnded` is raised where the call would end with a gRPC
    status (the ``abort`` error policy, or ``context.abort``).

    Example::

        async def test_the_key_is_checked():
            client = AuthzClient(KeyCheck(plaintext_address=("127.0.0.1", 0),
                                          disable_tls=True, combined_health_check=True))
            reply = await client.check(headers={"x-api-key": "wrong"})
            assert reply.denied_response.status.code == 401
    """

    def __init__(self, server: AuthzServer, metadata: Sequence[tuple[str, str]] = ()) -> None:
        self.server = server
        self._metadata = tuple(metadata)

    async def check(self, *args: Any, **described: Any) -> apb.CheckResponse:
        """Send one check: a `CheckRequest`, or the arguments of `check_request`
        (``check("POST", "/orders", headers={...})``); return the reply."""
        if args and isinstance(args[0], apb.CheckRequest):
            if len(args) > 1 or described:
                raise TypeError("check() takes a CheckRequest or check_request() arguments, "
                                "not both")
            request = args[0]
        else:
            request = check_request(*args, **described)
        try:
            data = await self.server.check_bytes(request.SerializeToString(),
                                                 _FakeContext(self._metadata))
        except StreamAbort as abort:
            raise StreamEnded(abort.code, abort.details) from None
        return apb.CheckResponse.FromString(data)
