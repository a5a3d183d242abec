"""The errors calloutkit raises.

The whole tree::

    CalloutKitError            base of everything below
    ├── ConfigError            bad options: a missing port, an unreadable certificate, no listener
    ├── TargetError            `calloutkit serve TARGET` could not find a server in TARGET
    └── CalloutError           a callback broke the protocol (returned the wrong type, ...)

`ConfigError` is raised once, when a server is constructed, never while serving. `CalloutError`
is raised inside a stream and handled by the server's error policy; the gateway never sees its
text.

Example::

    try:
        CalloutServer(cert_chain_path="/nope.pem", private_key_path="/nope.key")
    except ConfigError as exc:
        print(exc)   # cannot read certificate chain '/nope.pem': No such file or directory
"""

from __future__ import annotations


class CalloutKitError(Exception):
    """Base class of every error calloutkit raises on purpose."""


class ConfigError(CalloutKitError, ValueError):
    """An option is invalid. Raised at construction, with a one-line message naming the option."""


class TargetError(CalloutKitError):
    """A `serve` target does not name a loadable server class.

    When the target's own code raised while being imported, ``user_traceback`` holds the
    traceback of the target's frames (formatted, without calloutkit's); else it is empty.
    """

    user_traceback: str = ""


class CalloutError(CalloutKitError):
    """A callback returned something the protocol cannot carry."""
