"""Alias of `calloutkit.CalloutServer` under the documented path."""

from calloutkit import CalloutContext, CalloutServer, ErrorPolicy
from calloutkit.runtime._config import format_address as _addr_to_str

__all__ = ["CalloutContext", "CalloutServer", "ErrorPolicy", "_addr_to_str"]
