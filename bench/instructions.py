"""Instructions per ext_proc stream or message, counted by valgrind: noise does not move them.

    make bench-instructions                          # about 10 minutes
    .venv/bin/python bench/instructions.py --work headers --streams 1000
    .venv/bin/python bench/instructions.py --streams 10 --messages 500 --variant "calloutkit async"

Timings on a shared machine drift by 10% from one minute to the next; instruction counts do
not. Each server of `servers.py` runs under callgrind with instrumentation switched off.
After a warm-up, it is switched on for exactly ``--streams`` streams from h2load (one message
each unless ``--messages`` says otherwise), then off, and the count is read. It covers every
thread of the server (the event loop and gRPC's own threads) and nothing else. Variants run
one after another, because a second valgrind competing for the cores makes gRPC's polling
threads spin and count more; run to run, a count moves by about 1%.

Instructions are not time (cache misses, lock waits and system calls are not in them), so
this complements ``run.py`` rather than replacing it: it says which side executes more.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import tempfile

from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from load import Server, grpc_frame, h2load, need
from scenarios import BODY, EXT_PROC_PATH, ext_proc_message

# label, servers.py IMPL, loop, the label of the floor on the same loop
VARIANTS = [
    ("floor", "floor", "asyncio", "floor"),
    ("floor, uvloop", "floor", "uvloop", "floor, uvloop"),
    ("calloutkit async", "async", "uvloop", "floor, uvloop"),
    ("calloutkit sync (inline)", "inline", "uvloop", "floor, uvloop"),
    ("calloutkit sync (pool)", "sync", "uvloop", "floor, uvloop"),
    ("calloutkit async, asyncio loop", "async", "asyncio", "floor"),
]


def body_message() -> pb.ProcessingRequest:
    """A BUFFERED 16 KB response body, as Envoy sends it."""
    request = pb.ProcessingRequest()
    request.response_body.body = BODY
    request.response_body.end_of_stream = True
    request.protocol_config.response_body_mode = ProcessingMode.BUFFERED
    return request


MESSAGES = {"headers": ext_proc_message, "body": body_message}


def count(impl: str, work: str, loop: str, streams: int, messages: int) -> float:
    """Instructions per message of one server under callgrind, ``messages`` per stream."""
    control = need("callgrind_control", "valgrind")
    folder = tempfile.mkdtemp(prefix="calloutkit-callgrind-")
    server = Server(impl, work, loop=loop, under=(
        # glibc copies large buffers with `rep movsb`, which valgrind counts once per byte:
        # a 16 KB copy would count as 16,000 instructions. Vector copies count about right.
        "env", f"GLIBC_TUNABLES=glibc.cpu.x86_rep_movsb_threshold={1 << 30}",
        need("valgrind", "valgrind"), "--tool=callgrind", "--instr-atstart=no",
        "--callgrind-out-file=" + os.path.join(folder, "callgrind.out")))
    try:
        server.ready(timeout=180)
        frame = grpc_frame(MESSAGES[work]()) * messages

        def load(n: int) -> None:
            result = h2load(server.port, EXT_PROC_PATH, frame, streams=n,
                            connections=min(16, n), concurrent=4 if n >= 64 else 1)
            if result.failed or result.streams != n:
                raise SystemExit(f"{impl} {work}: {result.failed} of {n} streams failed")

        load(max(1, 100 // messages, streams // 5))  # warm-up, not counted
        pid = str(server.popen.pid)
        subprocess.run([control, "--instr=on", pid], check=True, capture_output=True)
        load(streams)
        subprocess.run([control, "--instr=off", pid], check=True, capture_output=True)
        subprocess.run([control, "--dump", pid], check=True, capture_output=True)
        total = 0
        for path in glob.glob(os.path.join(folder, "callgrind.out*")):
            with open(path) as handle:
                found = re.search(r"^totals: (\d+)", handle.read(), re.M)
            total += int(found.group(1)) if found else 0
        return total / (streams * messages)
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", choices=sorted(MESSAGES), action="append",
                        help="headers and/or body (default: both)")
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=1,
                        help="messages per stream (default 1: the cost of a stream)")
    parser.add_argument("--variant", action="append", choices=[v[0] for v in VARIANTS],
                        help="run just this variant and its floor (repeatable)")
    args = parser.parse_args()
    chosen = set(args.variant or [v[0] for v in VARIANTS])
    chosen |= {v[3] for v in VARIANTS if v[0] in chosen}
    for work in args.work or ["headers", "body"]:
        print(f"\n## ext_proc, {work} work: {args.streams} streams of {args.messages} "
              "message(s) (instructions per message, every thread of the server)", flush=True)
        counted: dict[str, float] = {}
        for label, impl, loop, floor in VARIANTS:
            if label not in chosen:
                continue
            counted[label] = count(impl, work, loop, args.streams, args.messages)
            ratio = counted[label] / counted[floor]
            print(f"  {label:32s} {counted[label]:10,.0f}   x {ratio:.3f} against {floor!r}",
                  flush=True)


if __name__ == "__main__":
    main()
