"""authz_header_allowlist: let in only callers whose API key is on the list, and tell the
upstream who they are.

- ``x-api-key`` on the list: the request goes on with ``x-caller: <name>`` (a client's own
  ``x-caller`` is replaced, so the upstream can trust it) and the key itself removed; the
  client sees ``x-authz: allowed`` on the response.
- no key, or an unknown one: ``401`` with ``www-authenticate: ApiKey`` and a JSON error.
- health checks (``GET /healthz``) need no key.

The list is ``API_KEYS`` (``key=name`` pairs, comma-separated), read at start.

Try it::

    API_KEYS=k-ada=ada,k-bob=bob calloutkit serve examples/authz_header_allowlist
    calloutkit send --authz examples/authz_header_allowlist/check.yaml

Envoy: the ext_authz HTTP filter in gRPC mode (``docs/authz.md``).
"""

from __future__ import annotations

import hmac
import json
import os

from calloutkit import AuthzRequest, AuthzServer, allow_request, deny_request, nonblocking

_DENIED = json.dumps({"error": "a valid x-api-key header is required"}) + "\n"


def _keys(text: str) -> dict[str, str]:
    pairs = (part.split("=", 1) for part in text.split(",") if "=" in part)
    return {key.strip(): name.strip() for key, name in pairs}


class HeaderAllowList(AuthzServer):
    """Allow requests whose ``x-api-key`` is in ``API_KEYS``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.keys = _keys(os.environ.get("API_KEYS", "k-ada=ada"))

    def _caller(self, key: str) -> str | None:
        # compare_digest: how long a comparison takes says nothing about the keys
        return next((name for known, name in self.keys.items()
                     if hmac.compare_digest(known.encode(), key.encode())), None)

    @nonblocking
    def on_check(self, request: AuthzRequest, context):
        if request.method == "GET" and request.path == "/healthz":
            return None
        caller = self._caller(request.headers.get("x-api-key", ""))
        if caller is None:
            return deny_request(401, _DENIED, [("www-authenticate", "ApiKey"),
                                               ("content-type", "application/json")])
        return allow_request(headers_to_set=[("x-caller", caller)],
                             headers_to_remove=["x-api-key"],
                             response_headers_to_add=[("x-authz", "allowed")])
