"""Alias of `calloutkit.CalloutServer` under the documented path."""

from calloutkit import CalloutContext, CalloutServer, ErrorPolicy

__all__ = ["CalloutContext", "CalloutServer", "ErrorPolicy"]
