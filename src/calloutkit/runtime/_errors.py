"""The errors calloutkit raises.

The whole tree::

    CalloutKitError            base of everything below
    ├── ConfigError            bad options: a missing port, an unreadable certificate, no listener
    ├── TargetError            `calloutkit serve TARGET` could not find a server in TARGET
    └── CalloutError           a callback broke the protocol (returned the wrong type, ...)
        └── CallbackTimeout    a ``def`` callback ran past ``callback_timeout``

Two more types say how a stream ends, for every protocol: `StreamAbort` (raised by a context's
``abort``: end the stream with this gRPC status) and `ErrorPolicy` (what a server answers when a
callback raises).

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

import enum

import grpc


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


class CallbackTimeout(CalloutError, TimeoutError):
    """A ``def`` callback still ran when its ``callback_timeout`` was over.

    The stream gets the error policy's reply, as for a raising callback; the thread that runs
    the callback is left to finish on its own, and the pool starts another in its place.
    """


class StreamAbort(Exception):
    """Raised by a context's ``abort``: ends the stream with a gRPC status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class ErrorPolicy(enum.Enum):
    """What the server answers when a callback raises (or returns something unusable).

    - ``FAIL_CLOSED`` (default): an ImmediateResponse 500 with a generic body; the request
      does not reach the upstream.
    - ``CONTINUE``: the empty reply for that phase; the request goes on unmodified.
    - ``ABORT``: end the stream with gRPC INTERNAL; Envoy applies ``failure_mode_allow`` /
      ``status_on_error``.

    The traceback is logged in every case; the exception text never reaches the gateway.

    Example::

        CalloutServer(error_policy=ErrorPolicy.CONTINUE)
    """

    FAIL_CLOSED = "fail_closed"
    CONTINUE = "continue"
    ABORT = "abort"


def parse_error_policy(value: ErrorPolicy | str) -> ErrorPolicy:
    """The `ErrorPolicy` an ``error_policy`` option names; `ConfigError` if it names none."""
    try:
        return ErrorPolicy(value)
    except ValueError:
        choices = ", ".join(p.value for p in ErrorPolicy)
        raise ConfigError(f"error_policy: {value!r} is not one of {choices}") from None
