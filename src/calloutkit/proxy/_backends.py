"""Backends: pools of equivalent plugin servers, with balancing and health.

Each target of a `Backend` has one long-lived channel. `Backend.pick` chooses among the
healthy targets, round-robin or least-outstanding (fewest calls in flight). A target is
unhealthy while it is *ejected* (passively: a call to it ended UNAVAILABLE, so it rests for
``eject_for`` seconds) or *failing its checks* (actively: ``grpc.health.v1.Health/Check`` did
not answer SERVING ``unhealthy_threshold`` times in a row). When no target is healthy, all of
them are used: trying beats refusing, and it is how a lone restarted backend comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..runtime._config import DEFAULT_MAX_MESSAGE_SIZE
from ._channels import channel_options
from ._config import BackendConfig
from ._director import ProxyError

logger = logging.getLogger(__name__)

_SERVING = health_pb2.HealthCheckResponse.SERVING


class Target:
    """One server of a backend: its channel and what the proxy knows about its health."""

    __slots__ = ("_fails", "_logged_at", "_oks", "address", "backend", "channel", "check_ok",
                 "ejected_until", "outstanding")

    def __init__(self, backend: Backend, address: str, channel: grpc.aio.Channel) -> None:
        self.backend = backend
        self.address = address
        self.channel = channel
        self.outstanding = 0
        self.ejected_until = 0.0
        self.check_ok = True
        self._fails = 0
        self._oks = 0
        self._logged_at = 0.0

    def healthy(self, now: float) -> bool:
        return self.check_ok and now >= self.ejected_until

    def finish(self, code: grpc.StatusCode) -> None:
        """`Destination.on_finish`: one call to this target ended with ``code``."""
        self.outstanding -= 1
        eject_for = self.backend.config.eject_for
        if code is grpc.StatusCode.UNAVAILABLE and eject_for > 0:
            if time.monotonic() >= self.ejected_until:
                logger.warning("backend %s: ejecting %s for %.1fs after UNAVAILABLE",
                               self.backend.name, self.address, eject_for)
            self.ejected_until = time.monotonic() + eject_for
        elif code is grpc.StatusCode.OK and self.ejected_until:
            self.ejected_until = 0.0  # it answered: it is back
        self.backend._maybe_close()

    def explain(self, error: BaseException, *, expose: bool = False) -> BaseException:
        """`Destination.err_handler` of a primary: the client learns that a backend was
        unavailable; which one, where and why goes to the log (and to the client too only
        with ``expose``: addresses and transport errors are the proxy's to keep)."""
        if isinstance(error, grpc.RpcError) and error.code() is grpc.StatusCode.UNAVAILABLE:
            detail = (f"backend {self.backend.name!r} ({self.address}) unavailable: "
                      f"{error.details()}")
            now = time.monotonic()
            if now - self._logged_at >= 1.0:  # a dead backend fails every call: once a second
                self._logged_at = now
                logger.warning("%s", detail)
            return ProxyError(grpc.StatusCode.UNAVAILABLE,
                              detail if expose else "backend unavailable")
        return error

    def note_check(self, ok: bool) -> None:
        health = self.backend.config.health_check
        assert health is not None
        if ok:
            self._fails, self._oks = 0, self._oks + 1
            if not self.check_ok and self._oks >= health.healthy_threshold:
                logger.info("backend %s: %s is healthy again", self.backend.name, self.address)
                self.check_ok = True
                self.ejected_until = 0.0
        else:
            self._oks, self._fails = 0, self._fails + 1
            if self.check_ok and self._fails >= health.unhealthy_threshold:
                logger.warning("backend %s: %s failed its health check", self.backend.name,
                               self.address)
                self.check_ok = False


class Backend:
    """A pool of targets behind one name; create it inside the running event loop.

    Example::

        backend = Backend(BackendConfig("team-a", ("127.0.0.1:5001", "127.0.0.1:5002")))
        backend.start()
        target = backend.pick()          # then Destination(target.channel, ...)
        ...
        await backend.aclose()
    """

    def __init__(self, config: BackendConfig, *,
                 max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self.config = config
        self.name = config.name
        options = channel_options(max_message_size)
        creds = None
        if config.tls is not None:
            tls = config.tls
            creds = grpc.ssl_channel_credentials(tls.ca, tls.key, tls.cert)
            if tls.server_name:
                options.append(("grpc.ssl_target_name_override", tls.server_name))
        self.targets = [
            Target(self, address, grpc.aio.secure_channel(address, creds, options=options)
                   if creds is not None else grpc.aio.insecure_channel(address, options=options))
            for address in config.targets]
        self._next = 0
        self._panic = False
        self._checker: asyncio.Task[None] | None = None
        self._retired = False
        self._closed = False
        self._closing: asyncio.Task[None] | None = None

    @property
    def outstanding(self) -> int:
        """Calls in flight to any target of this backend."""
        return sum(t.outstanding for t in self.targets)

    def pick(self) -> Target:
        """Choose a target for one call and count it in (`Target.finish` counts it out)."""
        now = time.monotonic()
        candidates = [t for t in self.targets if t.healthy(now)]
        if not candidates:
            if not self._panic:
                logger.warning("backend %s: no healthy target; trying all of them", self.name)
                self._panic = True
            candidates = self.targets
        elif self._panic:
            self._panic = False
        start = self._next
        self._next += 1
        count = len(candidates)
        if self.config.balancing == "least_outstanding" and count > 1:
            target = min((candidates[(start + i) % count] for i in range(count)),
                         key=lambda t: t.outstanding)
        else:
            target = candidates[start % count]
        target.outstanding += 1
        return target

    def start(self) -> None:
        """Start the active health checks, if configured."""
        if self.config.health_check is not None and self._checker is None:
            self._checker = asyncio.ensure_future(self._check_loop())

    async def _check_loop(self) -> None:
        health = self.config.health_check
        assert health is not None
        request = health_pb2.HealthCheckRequest(service=health.service)
        stubs = [(t, health_pb2_grpc.HealthStub(t.channel)) for t in self.targets]
        while True:
            results = await asyncio.gather(*(
                self._check(stub, request, health.timeout) for _, stub in stubs))
            for (target, _), ok in zip(stubs, results, strict=True):
                target.note_check(ok)
            await asyncio.sleep(health.interval)

    @staticmethod
    async def _check(stub: Any, request: Any, timeout: float) -> bool:
        try:
            reply = await stub.Check(request, timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == _SERVING)

    def retire(self) -> None:
        """Leave service after a reload: close once the calls in flight are done."""
        self._retired = True
        if self._checker is not None:
            self._checker.cancel()
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self._retired and not self._closed and self.outstanding <= 0:
            self._closed = True
            self._closing = asyncio.ensure_future(self._close_channels())

    async def _close_channels(self) -> None:
        for target in self.targets:
            await target.channel.close()

    async def aclose(self) -> None:
        """Stop the checks and close every channel (calls still open are cancelled)."""
        if self._checker is not None:
            self._checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checker
            self._checker = None
        if not self._closed:
            self._closed = True
            await self._close_channels()
        elif self._closing is not None:
            await self._closing
