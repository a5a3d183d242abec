"""Alias of `calloutkit.AuthzServer` under the documented path, as ``CalloutServerAuth``.

``on_check(request, context)`` receives the `CheckRequest` itself, as in the documented API
(`calloutkit.AuthzServer` hands it an `AuthzRequest`, whose ``raw`` is that message).
"""

from __future__ import annotations

from calloutkit import AuthzContext, AuthzServer, ErrorPolicy
from calloutkit.runtime._config import format_address


class CalloutServerAuth(AuthzServer):
    """`calloutkit.AuthzServer` with the documented API's shape: ``on_check`` gets the raw
    `CheckRequest`; returning None allows the request.

    Example::

        class Server(CalloutServerAuth):
            def on_check(self, request, context):
                if request.attributes.request.http.headers.get("x-block"):
                    return deny_request()
    """

    pass_raw_request = True


def _addr_to_str(address: tuple[str, int]) -> str:
    """``(host, port)`` as ``host:port`` (``[::1]:443`` for IPv6).

    >>> _addr_to_str(("0.0.0.0", 443))
    '0.0.0.0:443'
    """
    return format_address(address)


__all__ = ["AuthzContext", "CalloutServerAuth", "ErrorPolicy", "_addr_to_str"]
