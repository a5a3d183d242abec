"""calloutkit's benchmark suite: every comparison side by side, in one run.

    make bench                          # the whole suite, about 20 minutes on 2 cores
    .venv/bin/python bench/run.py --quick --only envoy-headers

Sections (``--only`` takes their names):

- ``envoy-headers``, ``envoy-body``: wrk through a real Envoy: Envoy alone (the ceiling), the
  bare grpc.aio servicer of `floor.py` (the floor) on the standard loop and on uvloop, and
  calloutkit with sync (thread pool), sync (``@nonblocking``, inline) and async callbacks, on
  its default loop, on the standard loop, and with 2 workers.
- ``grpc-streams``: one-message ext_proc streams from h2load straight at the server.
- ``grpc-workers-1ms``, ``grpc-workers-3ms``: 1 worker against 2 when each request costs ~1
  or ~3 ms of Python, so that the load generator is not what limits (2 cores run
  everything here: the heavier the callback, the smaller the share of those cores that
  h2load and each worker's gRPC I/O threads take).
- ``cpu-ceiling``: that callback's Python alone, without gRPC, in 2 processes against 1: what
  this machine gives two CPU-bound processes, the ceiling for the workers sections.
- ``grpc-one-stream``: many messages pipelined on one stream.
- ``tyk-dispatch``: Tyk Dispatch calls/s, the bare floor against calloutkit, and calloutkit
  behind ``calloutkit proxy``.
- ``idle-streams``: memory per held-open idle stream; every stream must answer afterwards.
- ``native-*`` (``--only native`` takes them all): the native transport (``transport=
  "native"``) against the floor on uvloop, the reference its targets are set against:
  through Envoy with ``def``, ``@nonblocking`` and ``async def`` callbacks (beside the same
  on grpc.aio), straight at the server, Tyk Dispatch, 2 workers against 1, idle streams,
  and RSS growth over many requests. Each target is printed beside its ratio, with whether
  it is met.

Each round measures every variant of a section once, in an order that rotates from round to
round, and the section's reference (the floor on the standard loop) before and after each
of them. The table shows medians over rounds, and ratios as the median of each measurement
against the mean of the two reference measurements around it, so that the machine's drift
cancels out. Results go to ``bench/results/<time>.json`` and, when matplotlib is
installed, a ``.png`` chart beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Any

from scenarios import (
    CeilingSection,
    EnvoySection,
    Figures,
    Goal,
    IdleSection,
    RssSection,
    Section,
    Variant,
    long_stream_section,
    streams_section,
    tyk_section,
    workers_section,
)

FLOOR = "floor"

ENVOY_VARIANTS = [
    Variant("envoy alone", None),
    Variant(FLOOR, "floor", loop="asyncio"),
    Variant("floor, uvloop", "floor"),
    Variant("calloutkit sync (pool)", "sync"),
    Variant("calloutkit sync (inline)", "inline"),
    Variant("calloutkit async", "async"),
    Variant("calloutkit async, asyncio loop", "async", loop="asyncio"),
    Variant("calloutkit async, 2 workers", "async", workers=2),
]

# Straight at the server there is no "Envoy alone"; the read/write API floor joins instead.
STREAM_VARIANTS = [ENVOY_VARIANTS[1], Variant("floor, read/write API", "floor-readwrite",
                                              loop="asyncio"), *ENVOY_VARIANTS[2:]]

ONE_STREAM_VARIANTS = [
    Variant(FLOOR, "floor", loop="asyncio"),
    Variant("floor, uvloop", "floor"),
    Variant("calloutkit sync (pool)", "sync"),
    Variant("calloutkit sync (inline)", "inline"),
    Variant("calloutkit async", "async"),
]

TYK_VARIANTS = [
    Variant(FLOOR, "floor", loop="asyncio"),
    Variant("floor, uvloop", "floor"),
    Variant("calloutkit sync (pool)", "sync"),
    Variant("calloutkit async", "async"),
    Variant("calloutkit async via calloutkit proxy", "async", via_proxy=True),
]

WORKER_VARIANTS = [Variant("calloutkit async, 1 worker", "async"),
                   Variant("calloutkit async, 2 workers", "async", workers=2)]

CEILING_VARIANTS = [Variant("1 process", None), Variant("2 processes", None, workers=2)]

IDLE_VARIANTS = [Variant(FLOOR, "floor", loop="asyncio"), Variant("calloutkit async", "async")]

# -- the native transport, against the floor on uvloop ---

UVLOOP_FLOOR = "floor, uvloop"
NATIVE_FLOOR = Variant(UVLOOP_FLOOR, "floor")
# Through Envoy (header mutation both ways, 32 connections): CPU per request, req/s, p99.
ENVOY_GOALS = (Goal("cpu_us", 0.25), Goal("rate", 1.8, at_most=False), Goal("p99_ms", 0.5))
CALLBACKS = [("def, pool", "sync"), ("def, @nonblocking", "inline"), ("async def", "async")]


def _on(transport: str, goals: tuple[Goal, ...] = ()) -> list[Variant]:
    return [Variant(f"calloutkit {transport}, {name}", impl, transport=transport,
                    goals=goals if transport == "native" else ())
            for name, impl in CALLBACKS]


NATIVE_ENVOY_VARIANTS = [NATIVE_FLOOR, *_on("grpcio"), *_on("native", ENVOY_GOALS)]
NATIVE_STREAM_VARIANTS = [NATIVE_FLOOR, *_on("native")]
NATIVE_TYK_VARIANTS = [NATIVE_FLOOR,
                       Variant("calloutkit native, def, pool", "sync", transport="native",
                               goals=(Goal("cpu_us", 0.3),)),
                       Variant("calloutkit native, async def", "async", transport="native",
                               goals=(Goal("cpu_us", 0.3),))]
NATIVE_WORKER_VARIANTS = [
    Variant("calloutkit native async, 1 worker", "async", transport="native"),
    Variant("calloutkit native async, 2 workers", "async", workers=2, transport="native",
            goals=(Goal("rate", 1.7, at_most=False),))]
NATIVE_IDLE_VARIANTS = [NATIVE_FLOOR, Variant(
    "calloutkit native, async def", "async", transport="native",
    goals=(Goal("unanswered", 0, of_reference=False), Goal("kb_per_stream", 1.0)))]
RSS_GOAL = (Goal("growth_mb", 5, of_reference=False),)
NATIVE_RSS_VARIANTS = [NATIVE_FLOOR,
                       Variant("calloutkit native, def, pool", "sync", transport="native",
                               goals=RSS_GOAL),
                       Variant("calloutkit native, async def", "async", transport="native",
                               goals=RSS_GOAL)]


def native(section: Section) -> Section:
    section.name = f"native-{section.name}"
    section.title = f"native transport: {section.title}"
    return section


def sections(args: argparse.Namespace) -> list[Section]:
    quick = args.quick
    seconds = 2 if quick else args.seconds
    return [
        EnvoySection("headers", ENVOY_VARIANTS, FLOOR, seconds, args.connections),
        EnvoySection("body", ENVOY_VARIANTS, FLOOR, seconds, args.connections),
        streams_section(STREAM_VARIANTS, FLOOR, 1500 if quick else 8000),
        workers_section(WORKER_VARIANTS, WORKER_VARIANTS[0].label, 640 if quick else 3200, 1),
        workers_section(WORKER_VARIANTS, WORKER_VARIANTS[0].label, 240 if quick else 1200, 3),
        CeilingSection(CEILING_VARIANTS, CEILING_VARIANTS[0].label, 1 if quick else 4),
        long_stream_section(ONE_STREAM_VARIANTS, FLOOR, 2000 if quick else 20000),
        tyk_section(TYK_VARIANTS, FLOOR, 1500 if quick else 8000),
        IdleSection(IDLE_VARIANTS, FLOOR, 1000 if quick else args.idle_streams),
        native(EnvoySection("headers", NATIVE_ENVOY_VARIANTS, UVLOOP_FLOOR, seconds,
                            args.connections)),
        native(streams_section(NATIVE_STREAM_VARIANTS, UVLOOP_FLOOR, 3000 if quick else 20000)),
        native(tyk_section(NATIVE_TYK_VARIANTS, UVLOOP_FLOOR, 3000 if quick else 20000)),
        native(workers_section(NATIVE_WORKER_VARIANTS, NATIVE_WORKER_VARIANTS[0].label,
                               640 if quick else 3200, 1)),
        native(workers_section(NATIVE_WORKER_VARIANTS, NATIVE_WORKER_VARIANTS[0].label,
                               240 if quick else 1200, 3)),
        # What 2 processes get from this machine at that moment, beside the workers' ratio.
        native(CeilingSection(CEILING_VARIANTS, CEILING_VARIANTS[0].label, 1 if quick else 4)),
        native(IdleSection(NATIVE_IDLE_VARIANTS, UVLOOP_FLOOR,
                           1000 if quick else args.idle_streams)),
        # Quick: a tenth of the streams, so the growth it shows is a tenth of a leak's.
        native(RssSection(NATIVE_RSS_VARIANTS, UVLOOP_FLOOR, *((2000, 20000) if quick
                                                               else (20000, 200000)))),
    ]


def run_section(section: Section, rounds: int) -> dict[str, Any]:
    """Measure every variant ``rounds`` times, each measurement between two of the reference.

    A round runs ``ref, A, ref, B, ref, ...``, the order of A, B, ... rotating from round to
    round. A variant's ratio is taken against the mean of the reference just before it and
    just after it: seconds apart rather than a whole round apart, and a drift of the machine
    that is steady over that span cancels exactly. (Sections that measure memory, which does
    not drift, run the reference once a round and take ratios within the round.)
    """
    labels = [v.label for v in section.variants]
    reference = section.reference
    others = [label for label in labels if label != reference]
    measured: dict[str, list[Figures]] = {label: [] for label in labels}
    against: dict[str, list[Figures]] = {label: [] for label in others}
    print(f"\n## {section.title}", flush=True)

    def measure(label: str, index: int) -> Figures:
        figures = section.measure(label)
        measured[label].append(figures)
        shown = figures.get("rate", figures.get("kb_per_stream", figures.get("growth_mb", 0.0)))
        print(f"  round {index + 1}/{rounds}  {label:40s} {shown:12,.1f}", flush=True)
        return figures

    section.start()
    try:
        for index in range(rounds):
            shift = index % max(1, len(others))
            order = others[shift:] + others[:shift]
            if not section.paired:
                same_round = measure(reference, index)
                for label in order:
                    measure(label, index)
                    against[label].append(same_round)
                continue
            before = measure(reference, index)
            for label in order:
                measure(label, index)
                after = measure(reference, index)
                against[label].append(_mean(before, after))
                before = after
    finally:
        section.stop()
    variants = {label: summarise(measured[label], against.get(label)) for label in labels}
    return {"title": section.title, "unit": section.unit, "reference": reference,
            "variants": variants,
            "goals": [check_goal(v.label, goal, variants[v.label])
                      for v in section.variants for goal in v.goals]}


def _mean(a: Figures, b: Figures) -> Figures:
    return {key: (a[key] + b[key]) / 2 for key in a.keys() & b.keys()}


def summarise(rounds: list[Figures], against: list[Figures] | None) -> dict[str, Any]:
    """Medians of a variant's figures and, given the reference measured around each of its
    measurements, the median and range of its ratios to that reference."""
    median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    out: dict[str, Any] = {"median": median, "rounds": rounds}
    if against:
        # Every figure against the reference's, round by round: what the goals read.
        out["ratios"] = {}
        for key in rounds[0].keys() & against[0].keys():
            if all(ref[key] for ref in against):
                each = [r[key] / ref[key] for r, ref in zip(rounds, against, strict=True)]
                out["ratios"][key] = {"median": statistics.median(each), "range":
                                      [min(each), max(each)]}
    if against is None and "rate" in rounds[0]:  # the reference itself
        out["rate_ratio"], out["rate_ratio_range"] = 1.0, [1.0, 1.0]
        out.update({key: 1.0 for key, figure in (("cpu_ratio", "cpu_us"), ("p99_ratio", "p99_ms"))
                    if rounds[0].get(figure)})
    elif against and "rate" in rounds[0]:
        out["against"] = against
        rate = [r["rate"] / ref["rate"] for r, ref in zip(rounds, against, strict=True)]
        out["rate_ratio"] = statistics.median(rate)
        out["rate_ratio_range"] = [min(rate), max(rate)]
        if against[0].get("cpu_us") and rounds[0].get("cpu_us"):
            cpu = [r["cpu_us"] / ref["cpu_us"] for r, ref in zip(rounds, against, strict=True)]
            out["cpu_ratio"] = statistics.median(cpu)
        if against[0].get("p99_ms") and rounds[0].get("p99_ms"):
            p99 = [r["p99_ms"] / ref["p99_ms"] for r, ref in zip(rounds, against, strict=True)]
            out["p99_ratio"] = statistics.median(p99)
    return out


def check_goal(label: str, goal: Goal, summary: dict[str, Any]) -> dict[str, Any]:
    """A goal against a variant's median; ``every_round`` says whether its worst round met it
    too, so that a pass the spread could undo shows."""
    if goal.of_reference:
        ratio = summary.get("ratios", {}).get(goal.key)
        value, (low, high) = (None, (None, None)) if ratio is None else (
            ratio["median"], ratio["range"])
    else:
        each = [r[goal.key] for r in summary["rounds"]]
        value, low, high = statistics.median(each), min(each), max(each)
    met = value is not None and goal.met(value)
    worst = high if goal.at_most else low
    return {"variant": label, "target": goal.text(), "value": value, "range": [low, high],
            "met": met, "every_round": met and worst is not None and goal.met(worst)}


# -- the report -----------------------------------------------------------------------------------

def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(result: dict[str, Any]) -> str:
    lines = []
    for data in result["sections"].values():
        lines.append(f"\n{data['title']}  ({data['unit']}; ratios against "
                     f"'{data['reference']}')")
        if data["unit"] == "MiB":
            header = ("variant", "RSS first MiB", "RSS last MiB", "growth MiB", "(range)")
            rows = []
            for label, v in data["variants"].items():
                growth = [r["growth_mb"] for r in v["rounds"]]
                rows.append((label, f"{v['median']['rss_first_mb']:.1f}",
                             f"{v['median']['rss_total_mb']:.1f}",
                             f"{v['median']['growth_mb']:.1f}",
                             f"{min(growth):.1f}-{max(growth):.1f}"))
        elif data["unit"] == "streams":
            header = ("variant", "held", "answered", "KiB/stream", "RSS held MiB", "open s")
            rows = [(label, f"{v['median']['held']:,.0f}", f"{v['median']['answered']:,.0f}",
                     f"{v['median']['kb_per_stream']:.1f}", f"{v['median']['rss_held_mb']:.0f}",
                     f"{v['median']['open_seconds']:.1f}")
                    for label, v in data["variants"].items()]
        else:
            header = ("variant", data["unit"], "x ref", "(range)", "p50 ms", "p99 ms", "x ref",
                      "p99.9 ms", "CPU us/op", "x ref", "peak RSS MiB")
            rows = []
            for label, v in data["variants"].items():
                m = v["median"]
                low, high = v.get("rate_ratio_range", [None, None])
                rows.append((label, f"{m['rate']:,.0f}", _cell(v.get("rate_ratio"), ".2f"),
                             f"{low:.2f}-{high:.2f}" if low is not None else "-",
                             _cell(m.get("p50_ms"), ".2f"), _cell(m.get("p99_ms"), ".2f"),
                             _cell(v.get("p99_ratio"), ".2f"), _cell(m.get("p999_ms"), ".2f"),
                             _cell(m.get("cpu_us") or None, ",.0f"),
                             _cell(v.get("cpu_ratio"), ".2f"),
                             _cell(m.get("peak_rss_mb") or None, ".0f")))
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, tuple("-" * w for w in widths), *rows]:
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    lines.extend(goals_table(result))
    return "\n".join(lines)


def goals_table(result: dict[str, Any]) -> list[str]:
    """Every target beside the measured value (median over rounds, and its range)."""
    rows = [(name, goal["variant"], goal["target"], _cell(goal["value"], ".2f"),
             "-" if goal["range"][0] is None else
             f"{goal['range'][0]:.2f}-{goal['range'][1]:.2f}",
             ("pass" if goal["every_round"] else "pass (not every round)") if goal["met"]
             else "FAIL")
            for name, data in result["sections"].items() for goal in data.get("goals", [])]
    if not rows:
        return []
    header = ("section", "variant", "target", "measured", "(range)", "")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return ["\nTargets (x ref: against the section's reference, measured around each run)",
            *("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
              for row in [header, tuple("-" * w for w in widths), *rows])]


def chart(result: dict[str, Any], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rated = [d for d in result["sections"].values() if d["unit"] not in ("streams", "MiB")]
    fig, axes = plt.subplots(len(rated), 1, figsize=(9, 2.2 + 1.9 * len(rated)), squeeze=False)
    for ax, data in zip(axes[:, 0], rated, strict=True):
        labels = [label for label, v in data["variants"].items() if "rate_ratio" in v]
        ratios = [data["variants"][label]["rate_ratio"] for label in labels]
        colors = ["#4c72b0" if label.startswith("calloutkit") else "#999999"
                  for label in labels]
        ax.barh(labels[::-1], ratios[::-1], color=colors[::-1])
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(data["title"], fontsize=8)
        ax.tick_params(labelsize=8)
        for y, ratio in enumerate(ratios[::-1]):
            ax.text(ratio, y, f" {ratio:.2f}", va="center", fontsize=7)
    axes[-1, 0].set_xlabel("throughput relative to each section's reference (median of ratios "
                           "to the reference measured around each run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def machine() -> dict[str, Any]:
    import grpc

    from calloutkit.testing._envoy import find_envoy

    envoy = subprocess.run([find_envoy(), "--version"], capture_output=True, text=True).stdout
    return {"cpus": os.cpu_count(), "machine": platform.machine(),
            "processor": _cpu_model(), "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "envoy": (re.findall(r"/(\d+\.\d+\.\d+)/", envoy) or ["?"])[0],
            "kernel": platform.release()}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds (default 4)")
    parser.add_argument("--seconds", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument("--idle-streams", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="a smoke run: short and 1 round")
    parser.add_argument("--only", action="append",
                        help="run just this section, or those named NAME-... (repeatable)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    chosen = [s for s in sections(args) if not args.only
              or any(s.name == name or s.name.startswith(name + "-") for name in args.only)]
    if not chosen:
        raise SystemExit(f"--only: no such section; choose from "
                         f"{', '.join(s.name for s in sections(args))}")
    rounds = 1 if args.quick else args.rounds
    started = time.time()
    result: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(), "rounds": rounds, "sections": {}}
    for section in chosen:
        result["sections"][section.name] = run_section(
            section, 1 if isinstance(section, IdleSection)
            else min(rounds, 2) if isinstance(section, RssSection) else rounds)
    result["seconds"] = round(time.time() - started)
    print(table(result))
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, time.strftime("%Y%m%d-%H%M%S"))
    with open(stem + ".json", "w") as handle:
        json.dump(result, handle, indent=1)
    drawn = chart(result, stem + ".png")
    print(f"\n{result['machine']['cpus']} CPUs ({result['machine']['processor']}), "
          f"{rounds} interleaved round(s), {result['seconds']} s. Wrote {stem}.json"
          + (f" and {stem}.png" if drawn else " (no chart: pip install matplotlib)"))


if __name__ == "__main__":
    sys.exit(main())
