"""What the calloutkit proxy costs: calls/s and added latency, proxy against direct calls.

    .venv/bin/python bench/proxy_bench.py            # about a minute on 2 vCPUs
    .venv/bin/python bench/proxy_bench.py --quick    # a smoke run, a few seconds

Every part runs in its own process, as in production: a raw-bytes echo backend (and a second
one for mirroring), the proxy started with ``calloutkit proxy --config`` on a generated routing
file, and this client. Each scenario is run over every path in turn, the order rotating each
round, so a noisy neighbour hurts all paths alike. The table gives the median rate over the
rounds, p50/p99 over all calls, what the proxy adds to them, and the proxy's CPU per call
(utime + stime of its process). Indicative only: client, proxy and backends share the CPU.

Paths: ``direct`` (client -> backend); ``proxy`` (unary fast path for unary calls);
``proxy generic`` (the same unary method proxied as a bidi stream); ``proxy + mirror`` (a
second backend gets a copy in the background).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from load import Child, Proxy

OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1),
           ("grpc.so_reuseport", 0)]
PAYLOAD = os.urandom(256)


# -- the backend (run with --serve-backend) ---------------------------------------------------

async def _serve_backend() -> None:
    async def unary(request: bytes, context: Any) -> bytes:
        return request

    async def bidi(request_iterator: Any, context: Any) -> None:
        while (frame := await context.read()) is not grpc.aio.EOF:
            await context.write(frame)

    server = grpc.aio.server(options=OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "UnaryGeneric": grpc.unary_unary_rpc_method_handler(unary),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
    }),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"PORT {port}", flush=True)
    await server.wait_for_termination()


# -- processes ----------------------------------------------------------------------------------

def start_backend(name: str) -> tuple[Child, int]:
    process = Child([sys.executable, __file__, "--serve-backend"],
                    tempfile.mkdtemp(prefix=f"calloutkit-bench-{name}-"))
    return process, int(process.wait_for(r"PORT (\d+)").group(1))


def start_proxy(backend: int, mirror: int) -> tuple[Proxy, int]:
    proxy = Proxy(f"""\
unary_methods: [/bench.Echo/Unary]
backends:
  echo: {{targets: 127.0.0.1:{backend}}}
  shadow: {{targets: 127.0.0.1:{mirror}}}
routes:
  - match: {{metadata: {{x-mirror: "1"}}}}
    backend: echo
    mirrors: [shadow]
default: echo
""")
    return proxy, proxy.port


# -- scenarios ------------------------------------------------------------------------------------

Path = tuple[str, grpc.aio.Channel, str, list[tuple[str, str]]]  # name, channel, method, md


async def unary(path: Path, calls: int, concurrency: int) -> list[float]:
    _, channel, method, metadata = path
    call = channel.unary_unary(method, None, None)
    latencies: list[float] = []

    async def worker(count: int) -> None:
        for _ in range(count):
            started = time.perf_counter()
            await call(PAYLOAD, metadata=metadata)
            latencies.append(time.perf_counter() - started)

    share = calls // concurrency
    await asyncio.gather(*(worker(share) for _ in range(concurrency)))
    return latencies


async def pingpong(path: Path, calls: int) -> list[float]:
    _, channel, _, metadata = path
    stream = channel.stream_stream("/bench.Echo/Bidi", None, None)(metadata=metadata)
    latencies = []
    for _ in range(calls):
        started = time.perf_counter()
        await stream.write(PAYLOAD)
        await stream.read()
        latencies.append(time.perf_counter() - started)
    await stream.done_writing()
    await stream.read()
    return latencies


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(args: argparse.Namespace) -> None:
    backend, backend_port = start_backend("backend")
    shadow, shadow_port = start_backend("shadow")
    proxy, proxy_port = start_proxy(backend_port, shadow_port)
    direct_ch = grpc.aio.insecure_channel(f"127.0.0.1:{backend_port}", options=OPTIONS)
    proxy_ch = grpc.aio.insecure_channel(f"127.0.0.1:{proxy_port}", options=OPTIONS)
    mirror_md = [("x-mirror", "1")]
    unary_paths: list[Path] = [
        ("direct", direct_ch, "/bench.Echo/Unary", []),
        ("proxy", proxy_ch, "/bench.Echo/Unary", []),
        ("proxy generic", proxy_ch, "/bench.Echo/UnaryGeneric", []),
        ("proxy + mirror", proxy_ch, "/bench.Echo/Unary", mirror_md),
    ]
    stream_paths: list[Path] = [
        ("direct", direct_ch, "", []), ("proxy", proxy_ch, "", []),
        ("proxy + mirror", proxy_ch, "", mirror_md)]
    scale = 0.1 if args.quick else 1.0
    Body = Callable[[Path, float], Awaitable[list[float]]]
    scenarios: list[tuple[str, str, list[Path], Body]] = [
        ("unary c=1", "calls", unary_paths, lambda p, k: unary(p, int(2000 * k), 1)),
        ("unary c=32", "calls", unary_paths, lambda p, k: unary(p, int(6400 * k), 32)),
        ("bidi ping-pong", "round trips", stream_paths,
         lambda p, k: pingpong(p, int(3000 * k))),
    ]
    try:
        for _, _, paths, body in scenarios:  # warm every connection and code path
            for path in paths:
                await body(path, 0.05)
        rows = []
        for name, unit, paths, body in scenarios:
            rates: dict[str, list[float]] = {p[0]: [] for p in paths}
            latencies: dict[str, list[float]] = {p[0]: [] for p in paths}
            cpu: dict[str, float] = {p[0]: 0.0 for p in paths}
            ops: dict[str, int] = {p[0]: 0 for p in paths}
            for round_index in range(args.rounds):
                shift = round_index % len(paths)
                for path in paths[shift:] + paths[:shift]:
                    before = proxy.tree.cpu()
                    started = time.perf_counter()
                    measured = await body(path, scale)
                    elapsed = time.perf_counter() - started
                    cpu[path[0]] += proxy.tree.cpu() - before
                    ops[path[0]] += len(measured)
                    rates[path[0]].append(len(measured) / elapsed)
                    latencies[path[0]].extend(measured)
                await asyncio.sleep(0.2)  # let mirrors finish between rounds
            base50 = _percentile(latencies["direct"], 0.5)
            base99 = _percentile(latencies["direct"], 0.99)
            for label, _, _, _ in paths:
                p50, p99 = _percentile(latencies[label], 0.5), _percentile(latencies[label], 0.99)
                proxied = label != "direct"
                rows.append((name, label, f"{statistics.median(rates[label]):,.0f} {unit}/s",
                             ", ".join(f"{r:,.0f}" for r in rates[label]), _ms(p50), _ms(p99),
                             f"+{_ms(p50 - base50)}" if proxied else "-",
                             f"+{_ms(p99 - base99)}" if proxied else "-",
                             f"{cpu[label] / ops[label] * 1e6:,.0f}" if proxied else "-"))
        header = ("scenario", "path", "rate (median)", "rounds", "p50 ms", "p99 ms",
                  "added p50", "added p99", "proxy CPU us/op")
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        print()
        for row in [header, tuple("-" * w for w in widths), *rows]:
            print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
        print(f"\n{args.rounds} interleaved rounds; {os.cpu_count()} CPUs shared by client, "
              f"proxy and backends; payload {len(PAYLOAD)} bytes.")
    finally:
        await direct_ch.close()
        await proxy_ch.close()
        for process in (proxy, backend, shadow):
            process.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--quick", action="store_true", help="a tenth of the calls")
    parser.add_argument("--serve-backend", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_backend:
        asyncio.run(_serve_backend())
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
