"""Prometheus metrics of one server (``pip install 'calloutkit[metrics]'``).

Built on the middleware where it fits (callback latency and errors), plus small hooks: the
stream accounting of `BaseServer` (streams started and active), each protocol's answer
function (messages per phase, L7 immediate responses), and a refresh of the gauges that
describe the server rather than a call (draining, the callback pool's threads), made before
each scrape and once a second.

With ``--workers`` every worker writes its values to files in ``PROMETHEUS_MULTIPROC_DIR``
(the supervisor makes that folder and removes it), and whichever worker answers a scrape
adds them all up. prometheus-client picks how it stores values when it is first imported,
which in a worker may have happened before the fork; `ServerMetrics` checks and switches to
the files when the folder is set.

prometheus-client is imported here only, and this module only when metrics are on.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ._errors import StreamAbort

if TYPE_CHECKING:
    from ._middleware import CallInfo

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Callbacks answer within a gateway's timeout (200 ms by default in Envoy), so the buckets
# are fine below it and coarse above.
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
_REFRESH_SECONDS = 1.0


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


class ServerMetrics:
    """The metrics of one server, labelled with its kind (``ext_proc``, ``tyk``, ...)."""

    def __init__(self, kind: str, error_policy: str | None) -> None:
        self.kind = kind
        self._policy = error_policy or "none"
        self._multiprocess = multiprocess_dir() is not None
        if self._multiprocess and values.ValueClass is values.MutexValue:
            values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
        # A registry of its own: several servers in one process (tests) count apart. In
        # multiprocess mode the values live in files, and a scrape reads those.
        registry = self._registry = CollectorRegistry(auto_describe=True)
        k = ("kind",)
        self.started = Counter("calloutkit_streams_started", "Streams (L7, L4) or calls "
                               "(ext_authz, Tyk, proxy) accepted", k, registry=registry)
        self.active = Gauge("calloutkit_streams_active", "Streams or calls in flight", k,
                            registry=registry, multiprocess_mode="livesum")
        self.messages = Counter("calloutkit_messages", "Messages received, per phase",
                                ("kind", "phase"), registry=registry)
        self.latency = Histogram("calloutkit_callback_duration_seconds", "Time in a callback "
                                 "and its middleware, per phase", ("kind", "phase"),
                                 buckets=_BUCKETS, registry=registry)
        self.errors = Counter("calloutkit_callback_errors", "Callbacks that raised, per what "
                              "the error policy answered", ("kind", "phase", "outcome"),
                              registry=registry)
        self.immediate = Counter("calloutkit_immediate_responses", "L7 immediate responses "
                                 "sent, per HTTP status", ("kind", "status"), registry=registry)
        self.draining = Gauge("calloutkit_draining", "1 once the server is stopping (health "
                              "NOT_SERVING), else 0", k, registry=registry,
                              multiprocess_mode="livemax")
        self.threads = Gauge("calloutkit_callback_threads", "Callback pool threads: busy "
                             "(running a def callback), stuck (past callback_timeout), limit "
                             "(threads the pool may run)", ("kind", "state"),
                             registry=registry, multiprocess_mode="livesum")
        self._active = self.active.labels(kind)
        self._started = self.started.labels(kind)
        self._phases: dict[str, Any] = {}
        self._timers: dict[str, Any] = {}
        self._refresh_handle: asyncio.TimerHandle | None = None
        # The metrics_address listener (an HttpHealthServer) and its port, when there is one.
        self.listener: Any = None
        self.port: int | None = None

    # -- streams and messages --------------------------------------------------------------

    def stream_started(self) -> None:
        self._started.inc()
        self._active.inc()

    def stream_ended(self) -> None:
        self._active.dec()

    def message(self, phase: str) -> None:
        counter = self._phases.get(phase)
        if counter is None:
            counter = self._phases[phase] = self.messages.labels(self.kind, phase)
        counter.inc()

    def immediate_response(self, status: int) -> None:
        self.immediate.labels(self.kind, str(status)).inc()

    # -- callbacks, as the outermost middleware ---------------------------------------------

    async def middleware(self, call: CallInfo, proceed: Callable[[], Any]) -> Any:
        histogram = self._timers.get(call.phase)
        if histogram is None:
            histogram = self._timers[call.phase] = self.latency.labels(self.kind, call.phase)
        started = time.perf_counter()
        try:
            return await proceed()
        except StreamAbort:
            raise  # the callback's own choice of status, not an error
        except Exception:
            self.errors.labels(self.kind, call.phase, self._policy).inc()
            raise
        finally:
            histogram.observe(time.perf_counter() - started)

    # -- the server's state ------------------------------------------------------------------

    def refresh(self, stopping: bool, busy: int, stuck: int, limit: int) -> None:
        self.draining.labels(self.kind).set(1 if stopping else 0)
        self.threads.labels(self.kind, "busy").set(busy)
        self.threads.labels(self.kind, "stuck").set(stuck)
        self.threads.labels(self.kind, "limit").set(limit)

    def refresh_every_second(self, loop: asyncio.AbstractEventLoop,
                             read: Callable[[], tuple[bool, int, int, int]]) -> None:
        """Keep the state gauges current for scrapes another worker answers."""
        self.refresh(*read())
        self._refresh_handle = loop.call_later(_REFRESH_SECONDS, self.refresh_every_second,
                                               loop, read)

    def close(self) -> None:
        if self._refresh_handle is not None:
            self._refresh_handle.cancel()
            self._refresh_handle = None

    def exposition(self) -> tuple[bytes, str]:
        """The text a scrape gets, and its content type."""
        if self._multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self._registry), CONTENT_TYPE_LATEST


def mark_worker_dead(pid: int) -> None:
    """Drop a dead worker's live gauges (its counters stay: they were counted)."""
    if multiprocess_dir() is not None:
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
