"""jwt_auth: verify an RS256 bearer token; pass its claims on as ``decoded-<claim>`` headers.

- valid token: the request goes on with one ``decoded-<claim>`` header per claim
  (``decoded-sub: alice``, ...); ``decoded-*`` headers the client sent itself are removed, so
  the upstream can trust them;
- missing, expired, badly signed or malformed token: the client gets ``401`` with a
  ``www-authenticate`` header and a JSON error; the upstream is never called.

The public key is read once, at start: ``public_key_path`` argument, else
``JWT_PUBLIC_KEY_PATH``, else ``keys/public.pem`` beside this file. ``JWT_AUDIENCE`` and
``JWT_ISSUER`` (or the ``audience`` / ``issuer`` arguments) make those claims required.

Needs PyJWT and cryptography: ``pip install 'calloutkit[examples]'``.

Try it::

    TOKEN=$(python examples/jwt_auth/mint_token.py --sub alice)   # also creates keys/
    calloutkit serve examples/jwt_auth
    curl -H "authorization: Bearer $TOKEN" http://127.0.0.1:10000/   # through Envoy

Envoy settings: request headers SEND (the default).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import jwt
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

DEFAULT_KEY = Path(__file__).resolve().parent / "keys" / "public.pem"
PREFIX = "decoded-"
_NOT_A_HEADER_CHAR = re.compile(r"[^a-z0-9_.-]")


def unauthorized(error: str, description: str) -> ImmediateResponse:
    """A 401 that tells the client why, in the form RFC 6750 describes."""
    challenge = f'Bearer error="{error}", error_description="{description}"'
    return header_immediate_response(
        401, headers=[("www-authenticate", challenge), ("content-type", "application/json")],
        body=json.dumps({"error": error, "error_description": description}) + "\n",
        details=f"calloutkit_jwt_{error}")


def claim_headers(claims: dict[str, Any]) -> list[tuple[str, str]]:
    """``{"sub": "alice", "roles": ["a"]}`` -> ``[("decoded-sub", "alice"), ("decoded-roles",
    '["a"]')]``; claim names become lower-case header-safe names."""
    out = []
    for name, value in claims.items():
        header = PREFIX + _NOT_A_HEADER_CHAR.sub("-", name.lower())
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        out.append((header, text))
    return out


class JwtAuthServer(CalloutServer):
    """Lets a request through only with a valid RS256 bearer token."""

    def __init__(self, *args: Any, public_key_path: str | os.PathLike[str] | None = None,
                 audience: str | None = None, issuer: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        path = Path(public_key_path or os.environ.get("JWT_PUBLIC_KEY_PATH") or DEFAULT_KEY)
        try:
            self.public_key = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"jwt_auth: cannot read the public key {path}: {exc.strerror}; "
                              "run examples/jwt_auth/mint_token.py to make a test key pair"
                              ) from None
        self.audience = audience or os.environ.get("JWT_AUDIENCE")
        self.issuer = issuer or os.environ.get("JWT_ISSUER")
        required = ["exp", *(["aud"] if self.audience else []), *(["iss"] if self.issuer else [])]
        self._options = {"require": required}

    def verify(self, token: str) -> dict[str, Any]:
        """The token's claims; raises `jwt.InvalidTokenError` (or a subclass) if it is bad."""
        claims: dict[str, Any] = jwt.decode(
            token, self.public_key, algorithms=["RS256"], audience=self.audience,
            issuer=self.issuer, options=self._options)  # type: ignore[arg-type]
        return claims

    # A plain def: RSA verification is CPU work, so it runs in the thread pool.
    def on_request_headers(self, headers: HttpHeaders,
                           context: CalloutContext) -> HeadersResponse | ImmediateResponse:
        scheme, _, token = (get_header(headers, "authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return unauthorized("invalid_request", "missing bearer token")
        try:
            claims = self.verify(token.strip())
        except jwt.ExpiredSignatureError:
            return unauthorized("invalid_token", "token expired")
        except jwt.InvalidSignatureError:
            return unauthorized("invalid_token", "bad signature")
        except jwt.InvalidTokenError as exc:
            logger.info("rejected token: %s", exc)
            return unauthorized("invalid_token", "invalid token")
        added = claim_headers(claims)
        ours = {name for name, _ in added}
        spoofed = [h.key for h in headers.headers.headers
                   if h.key.startswith(PREFIX) and h.key not in ours]
        return add_header_mutation(
            add=added, remove=spoofed, clear_route_cache=True,
            append_action=HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)
