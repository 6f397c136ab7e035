"""The sample app's routes with and without the tracer, and under the tools users pick instead.

    python -m benchmarks.bench_routes            # a Markdown table per section
    python -m benchmarks.bench_routes --quick    # fewer rounds, for a smoke check

In-process ASGI (no sockets) with 50 requests in flight at a time, every variant in every
round, ratios against the bare app taken round by round, medians reported. Variants that need
the process in another state (instrumentation installed, hooks on) are grouped by it, the
state changed only between groups, each group warmed up untimed after the change (CPython
re-learns its specialized lookups when a class changes), the groups leading in turn;
throughput per second of wall-clock time, and, for the untraced variants, per second of the
process's CPU time too (steadier on a shared machine).
Variants: the bare app (no instrumentation installed); the middleware with every
instrumentation installed and the request untraced; 1 % sampled; every request traced;
OpenTelemetry's ASGI + httpx instrumentation with the SDK (batch processor, in-memory
exporter); pyinstrument profiling each request (its per-request middleware recipe); viztracer
with ``log_async`` around each request (the two profilers only one request at a time: they
profile the whole process); and, to take 1 % sampling apart, untraced requests with the hooks
on (what every request pays once a request was traced).

What 1 % sampling costs is predicted from the parts measured in the same round, in CPU time per
request: 99 untraced requests, one traced, and the hooks' cost on the untraced ones for the share
of the time the hooks were on (``hooks_on_ns()`` over the sampled run). The measured ratio is
printed beside it, so a reader sees both what the cost is and where it comes from.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import os
import random
import statistics
import sys
import tempfile
import time
import tracemalloc
from typing import Any

from .alternatives import otel_middleware, pyinstrument_recipe, viztracer_recipe, wrap_per_request
from .harness import ASGIApp, answered, bare_app, measured, one_request, throughput

ROUTES = ["/parallel", "/nested", "/timers", "/cache", "/sync", "/items"]


async def routes_table(rounds: int, n: int) -> tuple[list[str], list[str]]:
    """Throughput with 50 requests in flight, relative to the bare app in the same round; and
    what 1 % sampling costs, taken apart: the traced requests themselves, and the hooks every
    other request goes through while one of them is in flight."""
    import asgi_asynctrace
    from asgi_asynctrace import AsyncTraceMiddleware, _middleware
    from asgi_asynctrace._hooks import hooks_on_ns, install_hooks, uninstall_hooks
    from sample_app.app import app as sample

    bare = bare_app(sample)
    idle = AsyncTraceMiddleware(bare, log_traces=False, store_size=100)
    sampled = AsyncTraceMiddleware(bare, log_traces=False, store_size=100, sample_rate=0.01)
    # The sampling draw, made a counter: exactly one request in 100 is traced, evenly spaced,
    # so the number of traced requests in a round (4 of 400, give or take 2 at random) is not
    # what decides the figure. The check itself still runs on every request.
    _middleware._random = itertools.cycle([0.5] * 99 + [0.0]).__next__
    otel, otel_on, otel_off = otel_middleware(bare)
    for path in ROUTES:  # warm every path: caches filled, schema made, imports done
        await throughput(idle, path, 20, traced=True)
        await throughput(bare, path, 20)
    rows = ["| route | bare app | middleware idle | 1 % sampled | every request traced | "
            "OpenTelemetry ASGI + httpx | idle, CPU | 1 % sampled, CPU |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    parts = ["| route | untraced request, CPU | a traced one costs | hooks on, at 1 % sampled "
             "| an untraced request while they are on | 1 % sampled vs idle: predicted "
             "| measured | 1 % sampled vs untraced, hooks on, measured just before and after "
             "|", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    variants: dict[str, tuple[ASGIApp, bool]] = {  # app, traced
        "bare": (bare, False),
        "otel": (otel, False),
        "idle": (idle, False),
        "sampled": (sampled, False),
        "traced": (idle, True),
        "pinned": (idle, False),  # untraced, with the hooks on (as after a traced request)
        "pinned-after": (idle, False),  # the same again, right after the sampled run
    }
    names = list(variants)
    # Variants grouped by the state of the process they need: nothing of ours installed;
    # instrumentation on, hooks never installed (no request traced yet); hooks on for good.
    # Changing that state changes classes (the loop's, the instrumented libraries'), after
    # which CPython re-learns its specialized lookups: so the state changes only between
    # groups, each group starts with an untimed warm-up, and the groups take turns leading.
    groups: list[tuple[bool, bool, list[str]]] = [
        (False, False, ["bare", "otel"]),
        (True, False, ["idle"]),
        (True, True, ["pinned", "sampled", "pinned-after", "traced"]),
    ]
    for path in ROUTES:
        got: dict[str, list[float]] = {k: [] for k in [*names, "idle-cpu", "sampled-cpu"]}
        parts_got: dict[str, list[float]] = {
            k: [] for k in ("u", "t", "p", "on", "pred", "meas", "around")
        }
        for r in range(rounds):
            rates: dict[str, tuple[float, float]] = {}
            k = r % len(groups)
            for instrumented, hooks, members in groups[k:] + groups[:k]:
                if instrumented:
                    asgi_asynctrace.instrument()
                else:
                    asgi_asynctrace.uninstrument()
                if hooks:
                    install_hooks()
                else:
                    uninstall_hooks()
                for name in members:
                    app, traced = variants[name]
                    if name == "otel":  # its httpx instrumentation, on this variant's turn only
                        otel_on()
                    await measured(app, path, 50, traced)  # untimed: lookups re-learned
                    on, start = hooks_on_ns(), time.perf_counter_ns()
                    rates[name] = await measured(app, path, n, traced)
                    if name == "sampled":
                        share = (hooks_on_ns() - on) / (time.perf_counter_ns() - start)
                    if name == "otel":
                        otel_off()
            base, base_cpu = rates["bare"]
            got["bare"].append(base)
            for name in names[1:]:
                got[name].append(rates[name][0] / base)
            got["idle-cpu"].append(rates["idle"][1] / base_cpu)
            got["sampled-cpu"].append(rates["sampled"][1] / base_cpu)
            # CPU per request, in µs: untraced (hooks off), traced, untraced with hooks on.
            u, t, p = (1e6 / rates[v][1] for v in ("idle", "traced", "pinned"))
            predicted = u / (0.99 * u + 0.01 * t + 0.99 * share * (p - u))
            measured_ratio = rates["sampled"][1] / rates["idle"][1]
            # The same process state on both sides, measured just before and just after: the
            # machine's drift between groups (seconds apart) mostly cancels out.
            around = rates["sampled"][0] / ((rates["pinned"][0] + rates["pinned-after"][0]) / 2)
            for key, value in zip(parts_got, (u, t, p, share, predicted, measured_ratio, around),
                                  strict=True):  # fmt: skip
                parts_got[key].append(value)
        m = {k: statistics.median(v) for k, v in got.items()}
        rows.append(f"| {path} | {m['bare']:.0f} req/s | {m['idle']:.3f}x | {m['sampled']:.3f}x "
                    f"| {m['traced']:.2f}x | {m['otel']:.2f}x | {m['idle-cpu']:.3f}x "
                    f"| {m['sampled-cpu']:.3f}x |")  # fmt: skip
        q = {k: statistics.median(v) for k, v in parts_got.items()}
        parts.append(f"| {path} | {q['u']:.0f} µs | {q['t'] / q['u']:.1f} untraced "
                     f"| {100 * q['on']:.0f} % of the time | {100 * (q['p'] / q['u'] - 1):+.1f} % "
                     f"| {q['pred']:.3f}x | {q['meas']:.3f}x | {q['around']:.3f}x |")  # fmt: skip
    asgi_asynctrace.instrument()
    uninstall_hooks()
    return rows, parts


async def rate_table(rounds: int, n: int, path: str = "/cache") -> list[str]:
    """What one traced request costs as traced requests get rarer, on a CPU-bound route: the
    throughput at 1 traced request in 20 ... 1 in 400, against the middleware untraced, each
    run after 100 requests at that rate, the hooks on throughout (as after the first traced
    request)."""
    import asgi_asynctrace
    from asgi_asynctrace import AsyncTraceMiddleware, _middleware
    from asgi_asynctrace._hooks import install_hooks, uninstall_hooks
    from sample_app.app import app as sample

    asgi_asynctrace.instrument()
    install_hooks()
    bare = bare_app(sample)
    idle = AsyncTraceMiddleware(bare, log_traces=False, store_size=100)
    sampled = AsyncTraceMiddleware(bare, log_traces=False, store_size=100, sample_rate=0.5)
    every = (20, 50, 100, 200, 400)
    names: list[int] = [0, *every]  # 0: the idle middleware
    got: dict[int, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        rates: dict[int, float] = {}
        for k in names[r % len(names) :] + names[: r % len(names)]:
            app = idle if k == 0 else sampled
            if k:  # exactly one request in k is traced (the draw is made a counter)
                _middleware._random = itertools.cycle([0.9] * (k - 1) + [0.0]).__next__
            await measured(app, path, 100)
            rates[k] = (await measured(app, path, n))[1]
        for k in every:
            got[k].append(rates[k] / rates[0])
    rows = ["| one request traced in | throughput vs idle | a traced request costs |",
            "|---|---|---|"]  # fmt: skip
    for k in every:
        ratio = statistics.median(got[k])
        rows.append(f"| {k} | {ratio:.3f}x | {(1 / ratio - 1) * k + 1:.1f} untraced |")
    uninstall_hooks()
    return rows


async def cold_table(rounds: int, path: str = "/cache") -> list[str]:
    """What a traced request costs on its own, one request at a time, right after another
    traced one and after 10 ... 1000 untraced ones: how much a rare traced request pays for
    running code the processor has not run for a while (its caches and branch history hold
    the untraced requests' work by then). And after a few milliseconds of a loop that touches
    no memory, with an untraced request after the same loop beside it: what the machine
    itself takes from a process in that time (on a shared VM, the other guests' work), which
    an untraced request pays too."""
    from asgi_asynctrace import AsyncTraceMiddleware
    from asgi_asynctrace._hooks import uninstall_hooks
    from sample_app.app import app as sample

    app = AsyncTraceMiddleware(bare_app(sample), log_traces=False, store_size=100)

    async def timed(traced: bool) -> int:
        start = time.perf_counter_ns()
        await one_request(app, path, traced)
        return time.perf_counter_ns() - start

    for _ in range(100):
        await timed(True)
        await timed(False)
    untraced = statistics.median([await timed(False) for _ in range(rounds * 30)])
    rows = [f"| {path}: a traced request, after | latency | vs an untraced one | an untraced "
            "request after the same | traced vs that |", "|---|---|---|---|---|"]  # fmt: skip
    for gap in (0, 10, 100, 1000):
        got = []
        for _ in range(rounds * 3):
            for _ in range(gap):
                await one_request(app, path, False)
            got.append(await timed(True))
        took = statistics.median(got)
        after = "another traced request" if gap == 0 else f"{gap} untraced ones"
        rows.append(f"| {after} | {took / 1e3:.0f} µs | {took / untraced:.1f}x | - | - |")
    for ms in (1, 3, 12):
        both: dict[bool, list[int]] = {True: [], False: []}
        for _ in range(rounds * 3):
            for traced in (True, False):
                await one_request(app, path, False)
                _busy(ms)
                both[traced].append(await timed(traced))
        took, plain = statistics.median(both[True]), statistics.median(both[False])
        rows.append(f"| {ms} ms of a loop that touches no memory | {took / 1e3:.0f} µs | "
                    f"{took / untraced:.1f}x | {plain / 1e3:.0f} µs | "
                    f"{took / plain:.2f}x |")  # fmt: skip
    rows.append(f"| (an untraced request) | {untraced / 1e3:.0f} µs | 1.0x | - | - |")
    uninstall_hooks()
    return rows


def _busy(ms: float) -> None:
    """Keep the processor busy for ``ms`` without touching memory: a loop reading the clock."""
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        pass


# After a request profiled by pyinstrument or viztracer (which render a report or write a
# file, and go through much of memory doing it) the next request of any variant ran 2.4x its
# usual time, the second 1.2x, the third 1.07x. Timed on the second with the profilers in
# the same rotation, as before 2026-11-30's fourth session, every variant that followed one
# was slowed: the bare app's median on /cache rose from 0.17 ms to 0.27 ms and the traced
# variants' ratios were pulled towards 1 (traced to the store 1.09-1.12x, against 1.61x
# without the profilers in the run). Now each variant is timed on its fourth request in a
# row, and the profilers run in a pass of their own.
_IN_A_ROW = 4


async def latency_table(rounds: int) -> list[str]:
    """One request at a time: each way of looking at a request, over the bare app's latency
    (until the response's last body chunk is handed to the server: see ``answered``).

    pyinstrument and viztracer profile the whole process, so their per-request recipes only
    work one request at a time: that is how all of them are compared here, each variant timed
    on the last of ``_IN_A_ROW`` requests in a row (the cold table shows a traced request
    after untraced ones).
    """
    from asgi_asynctrace import AsyncTraceMiddleware
    from asgi_asynctrace._hooks import uninstall_hooks
    from sample_app.app import app as sample

    bare = bare_app(sample)
    traced = AsyncTraceMiddleware(bare, log_traces=False, store_size=100)
    # every request traced without asking: its trace goes to the store, not into a header
    stored = AsyncTraceMiddleware(bare, log_traces=False, store_size=100, sample_rate=1.0)
    otel, otel_on, otel_off = otel_middleware(bare)
    profiled = wrap_per_request(bare, pyinstrument_recipe())
    vized = wrap_per_request(bare, viztracer_recipe(tempfile.mkdtemp(prefix="asynctrace-bench-")))
    rows = ["| route | bare app | traced, trace in the header | traced, to the store only "
            "| OpenTelemetry | pyinstrument | viztracer |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip

    async def timed(app: ASGIApp, path: str, header: bool = False) -> int:
        return await answered(app, path, header)

    apps: dict[str, ASGIApp] = {"bare": bare, "traced": traced, "stored": stored, "otel": otel,
                                "pyi": profiled, "viz": vized}  # fmt: skip
    # The profilers run in a pass of their own, after ours, each pass with its own bare runs:
    # what a profiler leaves behind (see _IN_A_ROW) then never lands on our variants.
    passes = (["bare", "traced", "stored", "otel"], ["bare", "pyi", "viz"])
    rng = random.Random(8)
    for path in ROUTES:
        got: dict[str, list[float]] = {k: [] for k in apps}
        for names in passes:
            order = list(names)
            for _ in range(rounds * 6):
                # Each variant timed on the last of a few requests in a row, so that what it
                # is timed on is its own cost and not what the variant before it left behind;
                # and in a new order each round, since where a variant stands counts too (in a
                # fixed rotation the one after the bare app ran slowest: bench_parts).
                took: dict[str, int] = {}
                rng.shuffle(order)
                for name in order:
                    if name == "otel":
                        otel_on()
                    for _ in range(_IN_A_ROW - 1):
                        await timed(apps[name], path, name == "traced")
                    took[name] = await timed(apps[name], path, name == "traced")
                    if name == "otel":
                        otel_off()
                if names is passes[0]:
                    got["bare"].append(took["bare"])
                for name in names[1:]:
                    got[name].append(took[name] / took["bare"])
        m = {k: statistics.median(v) for k, v in got.items()}
        rows.append(f"| {path} | {m['bare'] / 1e6:.2f} ms | {m['traced']:.2f}x | "
                    f"{m['stored']:.2f}x | {m['otel']:.2f}x | {m['pyi']:.2f}x "
                    f"| {m['viz']:.2f}x |")  # fmt: skip
    uninstall_hooks()
    return rows


async def size_table() -> list[str]:
    """Serializing a 10,000-resource trace; memory per trace and per 10,000 stored traces."""
    from asgi_asynctrace import AsyncTraceMiddleware, Trace, TraceStore, capture_traces
    from asgi_asynctrace._context import ACTIVE, ResourceScope
    from sample_app.app import app as sample

    big = Trace.start()
    token = ACTIVE.set((big, big.root))
    for i in range(9_999):
        with ResourceScope("cache-get", key=f"item:{i}"):
            pass
    ACTIVE.reset(token)
    big.finish(time.perf_counter_ns())
    times = []
    for _ in range(20):
        start = time.perf_counter_ns()
        data = big.to_json()
        times.append(time.perf_counter_ns() - start)
    app = AsyncTraceMiddleware(bare_app(sample), log_traces=False, store_size=100)
    with capture_traces() as traces:
        await one_request(app, "/parallel", True)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    store = TraceStore(10_000)
    payload = traces[0].to_json()
    for i in range(10_000):
        traces[0].trace_id = f"{i:032x}"
        store(traces[0], bytes(bytearray(payload)))  # a copy each, as real traces are
    stored = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    # Unread: the store keeps each finished Trace as it is until someone reads it. Measured
    # on 1,000 real /parallel requests (whose traces share their stacks, as real ones do).
    kept = AsyncTraceMiddleware(bare_app(sample), log_traces=False, store_size=1_000)
    await one_request(kept, "/parallel", True)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(1_000):
        await one_request(kept, "/parallel", True)
    gc.collect()
    unread = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return [
        "| measure | result | target |",
        "|---|---|---|",
        f"| serialize a 10,000-resource trace to JSON (orjson) | "
        f"{statistics.median(times) / 1e6:.1f} ms ({len(data) // 1024} KiB) | <= 10 ms |",
        f"| one /parallel trace as JSON | {len(payload) / 1024:.1f} KiB | - |",
        f"| 10,000 such traces in the store, read (kept as JSON) | {stored / 2**20:.0f} MiB | - |",
        f"| 10,000 such traces in the store, unread (kept as `Trace`; from 1,000) | "
        f"{10 * unread / 2**20:.0f} MiB | - |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke check)")
    args = parser.parse_args()
    rounds, n = (2, 100) if args.quick else (11, 400)
    os.environ.setdefault("SAMPLE_DB", os.path.join(tempfile.mkdtemp(), "bench.db"))
    import logging

    logging.getLogger("asgi_asynctrace.trace").setLevel(logging.WARNING)

    async def everything() -> tuple[Any, ...]:
        return (await routes_table(rounds, n), await rate_table(rounds, 5 * n),
                await cold_table(rounds), await latency_table(rounds),
                await size_table())  # fmt: skip

    (routes, sampling), by_rate, cold, latency, sizes = asyncio.run(everything())
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs; {rounds} rounds of {n} "
          "requests per route and variant, 50 in flight; medians\n")  # fmt: skip
    print("Throughput, 50 requests in flight, relative to the bare app (1.000x = no cost):\n")
    print("\n".join(routes))
    print("\nWhat 1 % sampling costs, in CPU time per request, taken apart (50 in flight):\n")
    print("\n".join(sampling))
    print(f"\nOn /cache, as traced requests get rarer (CPU time, {5 * n} requests a run, "
          "50 in flight):\n")  # fmt: skip
    print("\n".join(by_rate))
    print(
        "\nOne request at a time: a traced request right after another, and after untraced ones:\n"
    )
    print("\n".join(cold))
    print("\nLatency of one request at a time, relative to the bare app (lower is better):\n")
    print("\n".join(latency))
    print()
    print("\n".join(sizes))


if __name__ == "__main__":
    main()
