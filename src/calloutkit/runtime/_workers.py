"""Several worker processes serving the same ports (Linux, SO_REUSEPORT).

The supervisor forks the workers before any gRPC object exists (gRPC does not survive a fork
once its core is running), restarts a worker that dies, and passes SIGTERM/SIGINT on so every
worker drains as a single server would (and SIGHUP, for servers that reload on it). The
kernel spreads new connections across the workers; connection age limits (set by the server
when ``workers > 1``) make Envoy's few long-lived HTTP/2 connections reconnect now and then,
so they spread too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType

logger = logging.getLogger(__name__)

# A worker that dies this soon after starting, this many times in a row, is not restarted:
# it would only crash again (a bad port, a broken import).
_FAST_DEATH_SECONDS = 1.0
_FAST_DEATHS_ALLOWED = 5


def supervise(workers: int, serve: Callable[[], None]) -> int:
    """Run ``serve`` in ``workers`` forked processes until a signal; return the exit code."""
    if not sys.platform.startswith("linux"):
        raise OSError("workers > 1 needs Linux (SO_REUSEPORT load balancing)")
    children: dict[int, tuple[int, float]] = {}  # pid -> (worker index, start time)
    stopping = False
    fast_deaths = 0

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            # A server that reloads on SIGHUP installs its own handler; others must not die of it.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            os.environ["CALLOUTKIT_WORKER"] = str(index)
            code = 0
            try:
                serve()
            except BaseException:
                logger.exception("worker %d failed", index)
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = (index, time.monotonic())

    def forward(sig: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if sig == signal.SIGHUP:  # a reload, not a stop: every worker re-reads its config
            for pid in children:
                _signal(pid, sig)
            return
        if stopping and sig in (signal.SIGTERM, signal.SIGINT):
            logger.warning("second %s: killing workers now", signal.Signals(sig).name)
            for pid in children:
                _signal(pid, signal.SIGKILL)
            return
        stopping = True
        for pid in children:
            _signal(pid, sig)

    previous = {sig: signal.signal(sig, forward)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        for index in range(workers):
            spawn(index)
        logger.info("supervisor %d: %d workers %s", os.getpid(), workers, sorted(children))
        exit_code = 0
        while children:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            if pid not in children:
                continue
            index, started = children.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            if stopping:
                exit_code = exit_code or (0 if code == 0 else 1)
                continue
            fast_deaths = fast_deaths + 1 if time.monotonic() - started < _FAST_DEATH_SECONDS \
                else 0
            if fast_deaths > _FAST_DEATHS_ALLOWED:
                logger.error("worker %d keeps dying at start (exit %s); stopping", index, code)
                stopping = True
                for other in children:
                    _signal(other, signal.SIGTERM)
                exit_code = 1
                continue
            logger.warning("worker %d (pid %d) exited with %s; restarting it", index, pid, code)
            spawn(index)
        return exit_code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it died on its own meanwhile
        os.kill(pid, sig)
