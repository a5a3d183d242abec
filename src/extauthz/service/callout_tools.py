"""Alias of calloutkit's ext_authz answers under the documented path."""

from calloutkit import allow_request, deny_request

__all__ = ["allow_request", "deny_request"]
