"""A real Envoy in front of a network (L4) callout server, and a TCP echo upstream for it.

`network_envoy_config` writes the bootstrap of the L4 deployment: a TCP listener whose filter
chain is ``envoy.filters.network.ext_proc`` (pointing at the callout server) followed by
``tcp_proxy`` (pointing at the upstream), every port chosen by the kernel. Run it with `Envoy`.
`TcpEchoServer` is the upstream: it sends every byte back and remembers what it received.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from ._envoy import _cluster

_NETWORK_EXT_PROC = ("type.googleapis.com/envoy.extensions.filters.network.ext_proc.v3."
                     "NetworkExternalProcessor")
_TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
_FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
_BACKLOG = 1024  # connections the echo server's kernel queue holds before it accepts them


def network_envoy_config(callout_port: int, upstream_port: int, *,
                         failure_mode_allow: bool = False, message_timeout: str = "2s",
                         process_read: str = "STREAMED", process_write: str = "STREAMED",
                         stat_prefix: str = "calloutkit",
                         forwarding_namespaces: Sequence[str] = (),
                         receiving_namespaces: Sequence[str] = (),
                         initial_metadata: Mapping[str, str] | None = None,
                         callout_tls_ca: str | None = None,
                         filter_options: Mapping[str, Any] | None = None,
                         listener_port: int = 0, admin_port: int = 0,
                         access_log: bool = True) -> dict[str, Any]:
    """An Envoy 1.40 bootstrap: TCP listener -> network ext_proc -> tcp_proxy -> upstream.

    ``process_read`` / ``process_write`` are ``STREAMED`` or ``SKIP``. Envoy's stats for the
    filter are ``network_ext_proc.<stat_prefix>.*`` (``streams_started``,
    ``read_data_injected``, ``connections_closed``, ``connections_reset``, ...).

    Example::

        with TcpEchoServer() as upstream, \\
                Envoy(network_envoy_config(server.plaintext_port, upstream.port)) as envoy:
            with socket.create_connection(("127.0.0.1", envoy.port)) as sock:
                sock.sendall(b"hello")
    """
    grpc_service: dict[str, Any] = {"envoy_grpc": {"cluster_name": "callout"}}
    if initial_metadata:
        grpc_service["initial_metadata"] = [{"key": k, "value": v}
                                            for k, v in initial_metadata.items()]
    ext_proc: dict[str, Any] = {
        "@type": _NETWORK_EXT_PROC, "stat_prefix": stat_prefix, "grpc_service": grpc_service,
        "failure_mode_allow": failure_mode_allow, "message_timeout": message_timeout,
        "processing_mode": {"process_read": process_read, "process_write": process_write},
    }
    if forwarding_namespaces or receiving_namespaces:
        ext_proc["metadata_options"] = {
            "forwarding_namespaces": {"untyped": list(forwarding_namespaces)},
            "receiving_namespaces": {"untyped": list(receiving_namespaces)}}
    ext_proc.update(filter_options or {})
    tcp_proxy: dict[str, Any] = {"@type": _TCP_PROXY, "stat_prefix": "tcp",
                                 "cluster": "upstream"}
    if access_log:
        tcp_proxy["access_log"] = [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": _FILE_LOG, "path": "/dev/stdout",
            "log_format": {"text_format_source": {"inline_string":
                "tcp %DOWNSTREAM_REMOTE_ADDRESS% rx=%BYTES_RECEIVED% tx=%BYTES_SENT% "
                "flags=%RESPONSE_FLAGS% details=%CONNECTION_TERMINATION_DETAILS%\n"}}}}]
    upstream = _cluster("upstream", upstream_port, http2=False)
    del upstream["typed_extension_protocol_options"]  # raw TCP: no HTTP options
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                 "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{"name": "tcp", "address": {"socket_address": {
                "address": "127.0.0.1", "port_value": listener_port}},
                "filter_chains": [{"filters": [
                    {"name": "envoy.filters.network.ext_proc", "typed_config": ext_proc},
                    {"name": "envoy.filters.network.tcp_proxy", "typed_config": tcp_proxy},
                ]}]}],
            "clusters": [_cluster("callout", callout_port, http2=True, tls_ca=callout_tls_ca),
                         upstream],
        },
    }


class TcpEchoServer:
    """A TCP upstream on a free loopback port that sends every byte back, run in a thread.

    When the client half-closes, it sends what is left and half-closes too. ``received``
    holds the bytes each connection delivered, in accept order, so a test can check what a
    callout changed on the way in.

    Example::

        with TcpEchoServer() as upstream:
            with socket.create_connection(("127.0.0.1", upstream.port)) as sock:
                sock.sendall(b"ping")
                assert sock.recv(4) == b"ping"
            assert upstream.received[0] == b"ping"
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._sock = socket.create_server((host, port), backlog=_BACKLOG)
        self.host = host
        self.port: int = self._sock.getsockname()[1]
        self._received: list[bytearray] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name="calloutkit-tcp-echo", daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def received(self) -> list[bytes]:
        """Bytes received per connection, in accept order (a connection still open: so far)."""
        return [bytes(b) for b in self._received]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen = bytearray()
        self._received.append(seen)
        try:
            while data := await reader.read(65536):
                seen += data
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
                await writer.drain()
        except OSError:
            pass  # a reset by the peer is part of what tests exercise
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def start(self) -> TcpEchoServer:
        self._thread.start()
        # start_server listens again on the socket it is given, with its own backlog (100
        # unless told): Envoy opens one upstream connection per client connection at once,
        # and a full accept queue drops SYNs until tcp_proxy's connect timeout fails them.
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, sock=self._sock, backlog=_BACKLOG),
            self._loop).result()
        return self

    def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None

            async def close() -> None:
                server.close()
                tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

            asyncio.run_coroutine_threadsafe(close(), self._loop).result()
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._loop.close()
        self._sock.close()

    def __enter__(self) -> TcpEchoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
