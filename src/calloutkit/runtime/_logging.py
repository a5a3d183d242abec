"""Which stream a log record belongs to, and the JSON log format.

A server that handles many streams at once writes interleaved log lines; to read them in a
log store each line must say which stream, and which gateway request, it came from. The
protocols call `begin_stream` when a stream (or a unary call) starts: one `ContextVar.set`
in the task grpc.aio runs that RPC in, so everything logged while the RPC is handled sees it,
user callbacks' own ``logging.getLogger(__name__)`` loggers included (a ``def`` callback's
pool thread gets a copy of the context, see `runtime/_invoke.py`). The task ends with the
RPC, so nothing needs resetting.

`StreamContextFilter` copies the stream's ids onto each record (``record.stream_id``,
``record.request_id``) and `JsonFormatter` writes a record as one JSON object per line. The
library never installs them: the ``calloutkit`` command does for ``--log-format json``, and a
program of its own calls `logging_context` (the public name) for a handler of its own.

What it costs: nothing while no handler asked for it (`enabled` is False, and the L7 and L4
servers decide once, when they first serve, not to call `begin_stream`); when on, one counter
increment, one small object and one `ContextVar.set` per stream (about 0.2 µs), plus a
`copy_context()` per ``def`` callback that runs in the thread pool.
"""

from __future__ import annotations

import contextvars
import datetime
import itertools
import json
import logging
import sys
from typing import Any

# True once a handler that reads the stream context exists: the protocols skip
# `begin_stream` altogether while it is False.
enabled = False

REQUEST_ID_HEADER = "x-request-id"

_ids = itertools.count(1)  # next() on a count is atomic in CPython: safe from any thread


class StreamLog:
    """The ids of one stream: a number unique in this process, and the gateway's request id.

    Mutable on purpose: an L7 stream learns its request id from the request headers, after
    the stream started, without a second `ContextVar.set`.
    """

    __slots__ = ("request_id", "stream_id")

    def __init__(self, request_id: str | None) -> None:
        self.stream_id = next(_ids)
        self.request_id = request_id


current: contextvars.ContextVar[StreamLog | None] = contextvars.ContextVar(
    "calloutkit_stream", default=None)


def begin_stream(request_id: str | None = None) -> StreamLog:
    """Mark the running task (or thread) as handling a new stream; return its ids."""
    log = StreamLog(request_id)
    current.set(log)
    return log


def metadata_request_id(grpc_context: Any) -> str | None:
    """The ``x-request-id`` of a call's gRPC metadata, when the gateway sent one."""
    try:
        metadata = grpc_context.invocation_metadata() if grpc_context is not None else None
    except Exception:  # an in-process test context may have no metadata
        return None
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER:
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


class StreamContextFilter(logging.Filter):
    """Put the stream's ``stream_id`` and ``request_id`` on every record (None outside one).

    A handler filter, not a logger filter: records that propagate from any logger, a user
    callback's included, pass through it in the task or thread that logged them.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        log = current.get()
        record.stream_id = None if log is None else log.stream_id
        record.request_id = None if log is None else log.request_id
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: time (ISO-8601, UTC), level, logger, message,
    pid, and when present exception, stack, stream_id and request_id."""

    def format(self, record: logging.LogRecord) -> str:
        time = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        entry: dict[str, Any] = {
            "time": time.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        for key in ("stream_id", "request_id"):
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        return json.dumps(entry, ensure_ascii=False, default=str)


def logging_context(handler: logging.Handler | None = None, *,
                    json: bool = True) -> logging.Handler:
    """Give log records the ids of the stream they were logged in; return the handler.

    Turns on the per-stream context (see the module docstring for its cost) and adds
    `StreamContextFilter` to ``handler`` (a new stderr `logging.StreamHandler` when None),
    with `JsonFormatter` when ``json`` is true. Nothing is attached to any logger: install
    the handler where you configure logging, before the server starts::

        import logging, calloutkit
        logging.basicConfig(level=logging.INFO, handlers=[calloutkit.logging_context()])
        MyServer().run()

    With ``json=False`` a text format can name the ids itself:
    ``"%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"``.
    ``calloutkit serve --log-format json`` does this for you.
    """
    global enabled
    enabled = True
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(StreamContextFilter())
    if json:
        handler.setFormatter(JsonFormatter())
    return handler
