"""The public surface changes only on purpose."""

from __future__ import annotations

import inspect

import calloutkit
import calloutkit.testing
import calloutkit.tools
import calloutkit.tyk


def test_all_is_sorted_and_complete():
    assert calloutkit.__all__ == sorted(calloutkit.__all__)
    # Exactly these: a name added or lost by accident fails here.
    assert set(calloutkit.__all__) == {
        "AuthzContext", "AuthzRequest", "AuthzServer", "allow_request", "deny_request",
        "BaseServer", "CallInfo", "CalloutContext", "CalloutError", "CalloutKitError",
        "CalloutServer", "ConfigError", "ErrorPolicy", "Headers", "NetworkCalloutServer",
        "NetworkContext", "PeerIdentity", "ProcessingResult", "ServerConfig", "TargetError",
        "add_body_mutation",
        "add_command_line_args", "add_dynamic_metadata", "add_header_mutation",
        "add_trailer_mutation", "body_contains", "build_dynamic_forwarding_metadata",
        "deny_callout", "get_header", "header_dict", "header_immediate_response",
        "headers_contain", "logging_context", "nonblocking", "override_mode", "parse_address"}
    for name in calloutkit.__all__:
        assert hasattr(calloutkit, name), name


def test_every_public_name_is_documented():
    for module in (calloutkit, calloutkit.testing, calloutkit.tools, calloutkit.tyk):
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                assert inspect.getdoc(obj), f"{module.__name__}.{name} has no docstring"
