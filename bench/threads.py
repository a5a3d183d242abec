"""Where a one-message stream's CPU goes, by thread of the server (Linux ``/proc``).

    python bench/threads.py [--streams N] [--transport native|grpcio] [--impl IMPL ...]

Starts each ``bench/servers.py`` variant (``inline``, ``async``, ``sync``: see there) on
header work, warms it up, then sends N one-message ext_proc streams with h2load (16
connections x 4 streams) and reads every thread's user + system time before and after. Threads
are grouped by name: the transport thread, the event loop (the process's main thread), the
callback pool, grpc's own threads, the rest. The figures are CPU µs per stream; h2load's
own CPU is not in them. `docs/performance.md` shows a run.
"""

from __future__ import annotations

import argparse
import os
import re
from collections import defaultdict

from load import CLOCK_TICKS, Server, grpc_frame, h2load
from scenarios import EXT_PROC_PATH, ext_proc_message

# Thread names as the kernel keeps them (15 characters). Python 3.11 does not name its
# threads there, so a callback pool thread carries the name of the thread that started it:
# the process's own, or the transport thread's when it was started from there (the oldest
# thread of that name is the transport thread itself).
_TRANSPORT_NAME = "calloutkit-tran"
GROUPS = (
    ("transport thread", re.compile(_TRANSPORT_NAME)),
    ("grpc threads", re.compile(r"grpc|default-executo|resolver|timer_manager")),
)


def _threads(pid: int) -> dict[int, tuple[str, float]]:
    """Every thread of ``pid``: its name and CPU seconds so far."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue  # the thread ended meanwhile
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
    return out


def _group(pid: int, tid: int, name: str, main_name: str, transport: int | None = None) -> str:
    if tid == pid:
        return "event loop (main thread)"
    if transport is not None and name == _TRANSPORT_NAME and tid != transport:
        return "other Python threads (pool)"
    for group, pattern in GROUPS:
        if pattern.match(name):
            return group
    if name == main_name:
        return "other Python threads (pool)"
    return f"other ({name})"


def measure(impl: str, transport: str, streams: int) -> dict[str, float]:
    """CPU µs per stream, by thread group, for one variant."""
    server = Server(impl, "headers", loop="uvloop", transport=transport).ready()
    try:
        body = grpc_frame(ext_proc_message())
        h2load(server.port, EXT_PROC_PATH, body, streams=2_000, connections=16, concurrent=4)
        pid = server.popen.pid
        before = _threads(pid)
        result = h2load(server.port, EXT_PROC_PATH, body, streams=streams, connections=16,
                        concurrent=4)
        after = _threads(pid)
    finally:
        server.stop()
    if result.failed:
        raise SystemExit(f"{impl}: {result.failed} streams failed")
    spent: dict[str, float] = defaultdict(float)
    main_name = after[pid][0]
    transport = min((tid for tid, (name, _) in after.items() if name == _TRANSPORT_NAME),
                    default=None)
    for tid, (name, cpu) in after.items():
        group = _group(pid, tid, name, main_name, transport)
        spent[group] += cpu - before.get(tid, (name, 0.0))[1]
    per_stream = {group: seconds * 1e6 / result.streams for group, seconds in spent.items()}
    per_stream["total"] = sum(per_stream.values())
    per_stream["streams/s"] = result.rate
    return per_stream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=20_000)
    parser.add_argument("--transport", default="native", choices=("native", "grpcio"))
    parser.add_argument("--impl", action="append", choices=("inline", "async", "sync"))
    args = parser.parse_args()
    for impl in args.impl or ["inline", "async", "sync"]:
        figures = measure(impl, args.transport, args.streams)
        rate = figures.pop("streams/s")
        print(f"{impl} ({args.transport}, {rate:,.0f} streams/s)")
        for group, micros in sorted(figures.items(), key=lambda kv: (kv[0] == "total", kv[0])):
            print(f"  {group:28} {micros:8.1f} µs/stream")


if __name__ == "__main__":
    main()
