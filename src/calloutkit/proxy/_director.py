"""What a director returns: where one call goes (`StreamParameters`, `Destination`), and the
limits its mirrors run under (`MirrorPolicy`).

A director is ``async def director(method, context, peeker) -> StreamParameters`` (a plain
``def`` works too). It sees the full method name, the inbound `ServicerContext` (metadata,
peer, deadline) and a peeker that can read the first request message. It answers with a
primary destination, whose responses go back to the client, and optional secondaries, which
get a copy of the request stream and whose responses are discarded. It refuses a call by
raising `ProxyError`, whose status reaches the client as is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from ..runtime._errors import CalloutKitError
from ._metadata import MetadataValue

if TYPE_CHECKING:
    from ._peeker import Peeker

#: ``err_handler(error)`` returns the error to report (the same or another), None to swallow
#: it, or bytes: a substitute response message for the client (primary only).
ErrHandler = Callable[[BaseException], "BaseException | bytes | Awaitable[Any] | None"]


class ProxyError(CalloutKitError):
    """A gRPC status for the client: raised by directors, finalizers and error handlers.

    Example::

        async def director(method, context, peeker):
            if dict(context.invocation_metadata()).get("x-team") is None:
                raise ProxyError(grpc.StatusCode.PERMISSION_DENIED, "no team")
            ...
    """

    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        super().__init__(f"{code.name}: {details}" if details else code.name)
        self.code = code
        self.details = details


def status_of(error: BaseException) -> ProxyError | None:
    """``error`` as a status for the client when it carries one: a `ProxyError`, or a
    ``grpc.RpcError`` with a code (an ``AioRpcError`` from a call the director or finalizer
    made). Only the code and details are kept, never the error's text."""
    if isinstance(error, ProxyError):
        return error
    if isinstance(error, grpc.RpcError):
        code, details = getattr(error, "code", None), getattr(error, "details", None)
        code = code() if callable(code) else None
        if isinstance(code, grpc.StatusCode):
            return ProxyError(code, (details() if callable(details) else None) or "")
    return None


class Overflow(enum.Enum):
    """What the proxy does when a secondary cannot keep up with the client.

    ``DROP`` (default): each secondary has a bounded queue; when it is full the secondary is cut
    off and its ``err_handler`` is told, so the client never waits for it. ``BLOCK``: the client
    and every destination wait for the slowest one (the behaviour Praefect relies on).
    """

    DROP = "drop"
    BLOCK = "block"


@dataclasses.dataclass
class Destination:
    """One backend leg of a proxied call.

    - ``channel``: a long-lived ``grpc.aio.Channel``, or a target string that the handler's
      `ChannelPool` turns into one (never a channel per call).
    - ``metadata``: what the backend receives; None forwards the client's metadata, filtered.
    - ``msg``: the first request message for this destination. None forwards the peeked frame
      unchanged; bytes replace it (or, when nothing was peeked, go before the client's stream).
    - ``err_handler``: sees this leg's error and returns it, another error, or None to swallow
      it. The primary's handler may also return bytes: a substitute response.
    - ``on_finish``: called once with the leg's final status code, for balancers and stats.

    Example::

        Destination(channel, msg=rewritten_first_message, err_handler=lambda exc: None)
    """

    channel: grpc.aio.Channel | str
    metadata: Sequence[tuple[str, MetadataValue]] | None = None
    msg: bytes | None = None
    err_handler: ErrHandler | None = None
    on_finish: Callable[[grpc.StatusCode], None] | None = None



class MirrorPolicy:
    """Limits for secondaries: queue size, own timeout, concurrent mirrored calls.

    One policy is meant to be shared by every call of a proxy, so ``max_in_flight`` caps
    mirrored calls process-wide; a mirror over the cap is skipped and its ``err_handler`` told.

    Example::

        mirror = MirrorPolicy(timeout=2.0, max_in_flight=50)
        StreamParameters(primary, secondaries=[shadow], mirror=mirror)
    """

    def __init__(self, *, timeout: float | None = 30.0, max_in_flight: int = 100,
                 queue_size: int = 16) -> None:
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self.queue_size = queue_size
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def in_flight(self) -> int:
        """Mirrored calls running in the background right now."""
        return len(self._tasks)

    def _admit(self) -> bool:
        return len(self._tasks) < self.max_in_flight

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait_idle(self) -> None:
        """Wait until no mirrored call is in flight."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    async def aclose(self) -> None:
        """Cancel the mirrored calls still running and wait for them."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


@dataclasses.dataclass
class StreamParameters:
    """Where one call goes and how: the director's answer.

    - ``primary``: the only destination whose headers, messages, trailers and status reach the
      client.
    - ``secondaries``: receive the same request stream; their responses are discarded.
    - ``req_finalizer``: ``async def`` (or ``def``) run once after the call, also on errors;
      raising `ProxyError` sets the status when nothing else failed.
    - ``wait_for_secondaries``: False (default) mirrors: secondaries finish in the background and
      their failures only reach their ``err_handler``. True waits for them and fails the call
      with INTERNAL when one fails and its handler does not swallow the error.
    - ``secondary_overflow``: `Overflow.DROP` or `Overflow.BLOCK`.
    - ``timeout``: seconds for the backend calls; the client's deadline still applies.
    - ``mirror``: the `MirrorPolicy` (queue size, own timeout, concurrency cap) for
      secondaries; share one across calls so the cap is global.
    - ``compression``, ``wait_for_ready``: passed to every backend call.

    Example::

        StreamParameters(Destination(primary_channel),
                         secondaries=[Destination(canary_channel)], timeout=5.0)
    """

    primary: Destination
    secondaries: Sequence[Destination] = ()
    req_finalizer: Callable[[], Any] | None = None
    compression: grpc.Compression | None = None
    wait_for_ready: bool | None = None
    wait_for_secondaries: bool = False
    secondary_overflow: Overflow | str = Overflow.DROP
    timeout: float | None = None
    mirror: MirrorPolicy | None = None

    def __post_init__(self) -> None:
        self.secondary_overflow = Overflow(self.secondary_overflow)


class Director(Protocol):
    """``director(method, context, peeker) -> StreamParameters`` (awaitable or not).

    Return None to answer UNIMPLEMENTED ("no route"); raise `ProxyError` to refuse.
    """

    def __call__(self, method: str, context: grpc.aio.ServicerContext[Any, Any],
                 peeker: Peeker) -> Any: ...
