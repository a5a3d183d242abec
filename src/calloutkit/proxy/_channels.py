"""Channels to backends: one long-lived channel per target, never one per call.

Dialing per call leaks file descriptors and pays a TCP and HTTP/2 handshake each time. A
`ChannelPool` keeps one ``grpc.aio`` channel per target string, with message size limits that
match the proxy's, and closes them all on `ChannelPool.aclose`.
"""

from __future__ import annotations

from typing import Any

import grpc

from ..runtime._config import DEFAULT_MAX_MESSAGE_SIZE


def channel_options(max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                    reconnect_max_seconds: float = 5.0) -> list[tuple[str, Any]]:
    """Options for a backend channel: the proxy's message limits on both legs, and a short
    reconnect backoff so a restarted backend is used again within seconds (gRPC's default
    backoff grows to two minutes).

    Example::

        grpc.aio.insecure_channel("127.0.0.1:50051", options=channel_options())
    """
    return [
        ("grpc.max_receive_message_length", max_message_size),
        ("grpc.max_send_message_length", max_message_size),
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.min_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", int(reconnect_max_seconds * 1000)),
        # Each backend gets its own connections; the process-wide subchannel pool would let two
        # backends with the same address (e.g. before and after a reload) share one.
        ("grpc.use_local_subchannel_pool", 1),
    ]


class ChannelPool:
    """One plaintext channel per target, created on first use, for `Destination` strings.

    Example::

        pool = ChannelPool()
        handler = TransparentHandler(director, channels=pool)
        ...
        await pool.aclose()
    """

    def __init__(self, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                 options: list[tuple[str, Any]] | None = None) -> None:
        self._options = options if options is not None else channel_options(max_message_size)
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, target: str) -> grpc.aio.Channel:
        """The channel for ``target`` (``host:port``), created on first use."""
        channel = self._channels.get(target)
        if channel is None:
            channel = grpc.aio.insecure_channel(target, options=self._options)
            self._channels[target] = channel
        return channel

    def __len__(self) -> int:
        return len(self._channels)

    async def aclose(self) -> None:
        """Close every channel (calls still open on them are cancelled)."""
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()
