"""Several worker processes serving the same ports (Linux, SO_REUSEPORT).

The supervisor forks the workers before any gRPC object exists (gRPC does not survive a fork
once its core is running), restarts a worker that dies, and passes SIGTERM/SIGINT on so every
worker drains as a single server would (and SIGHUP, for servers that reload on it). The
kernel spreads new connections across the workers; connection age limits (set by the server
when ``workers > 1``) make Envoy's few long-lived HTTP/2 connections reconnect now and then,
so they spread too.

A worker dies with its supervisor: should the supervisor be killed outright (SIGKILL, the OOM
killer), the kernel sends each worker SIGTERM (Linux's parent-death signal) and the worker
drains as on any SIGTERM. A worker also checks now and then that its parent is still the
supervisor, in case the parent-death signal could not be set. Without both, a killed
supervisor left its workers serving, and a new supervisor shared the port with them.

With metrics on, every worker writes its values to files in ``PROMETHEUS_MULTIPROC_DIR`` and
a scrape, whichever worker answers it, adds up all of them. The supervisor makes that folder
(unless the variable is set already: then the folder is the user's) before the first fork and
removes it when it exits; a dead worker's live gauges are dropped, its counters stay.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from types import FrameType

logger = logging.getLogger(__name__)

# A worker that dies this soon after starting, this many times in a row, is not restarted:
# it would only crash again (a bad port, a broken import).
_FAST_DEATH_SECONDS = 1.0
_FAST_DEATHS_ALLOWED = 5
# How often a worker checks that its supervisor is alive, should the parent-death signal fail.
_PARENT_CHECK_SECONDS = 1.0
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus-client in each worker


def supervise(workers: int, serve: Callable[[], None], *, metrics: bool = False) -> int:
    """Run ``serve`` in ``workers`` forked processes until a signal; return the exit code."""
    if not sys.platform.startswith("linux"):
        raise OSError("workers > 1 needs Linux (SO_REUSEPORT load balancing)")
    made = None
    if metrics and not os.environ.get(_MULTIPROC_ENV):
        made = os.environ[_MULTIPROC_ENV] = tempfile.mkdtemp(prefix="calloutkit-metrics-")
    try:
        return _supervise(workers, serve, metrics)
    finally:
        if made is not None:
            os.environ.pop(_MULTIPROC_ENV, None)
            shutil.rmtree(made, ignore_errors=True)


def _supervise(workers: int, serve: Callable[[], None], metrics: bool) -> int:
    children: dict[int, tuple[int, float]] = {}  # pid -> (worker index, start time)
    stopping = False
    fast_deaths = 0

    supervisor = os.getpid()

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            # A server that reloads on SIGHUP installs its own handler; others must not die of it.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            _die_with_parent(supervisor)
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
            if metrics:
                from ._metrics import mark_worker_dead

                mark_worker_dead(pid)
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


def _die_with_parent(parent: int) -> None:
    """Make this worker drain (SIGTERM) when ``parent``, its supervisor, dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as exc:
        logger.warning("worker %d: no parent-death signal (%s); polling for the supervisor "
                       "instead", os.getpid(), exc)
        # Only without the signal: a second SIGTERM would cut the drain short.
        threading.Thread(target=_watch_parent, args=(parent,), name="calloutkit-parent-watch",
                         daemon=True).start()
        return
    # The supervisor may have died between the fork and the prctl: the kernel sent nothing.
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(_PARENT_CHECK_SECONDS)
    logger.warning("worker %d: supervisor %d is gone; draining", os.getpid(), parent)
    os.kill(os.getpid(), signal.SIGTERM)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it died on its own meanwhile
        os.kill(pid, sig)
