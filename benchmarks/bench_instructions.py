"""Instructions per request under valgrind: the overhead ratios without the machine's noise.

    python -m benchmarks.bench_instructions            # a Markdown table (needs valgrind)
    python -m benchmarks.bench_instructions --quick    # fewer requests, for a smoke check

Timing ratios on a shared two-core VM move by a few per cent from run to run, as much as the
effects they should show. Counting the instructions a request executes does not move: callgrind
counts the same work the same way whatever else the machine is doing. Each variant runs in its
own process under ``valgrind --tool=callgrind`` (two at a time, one per core): it serves every
route, first untimed (imports, caches, CPython's specialization settle), then the counted
requests, 50 in flight, between two calls of ``os.getpgrp()`` that tell callgrind to cut its
count there (``--dump-before=getpgrp``), the heap collected and frozen before (``gc.freeze()``:
the collections during the count walk what the requests made, whatever else is loaded). The
ratios are given against the bare app as it is and against the bare app with every instrumented
library imported (what an app that uses them has loaded anyway). Instructions are not time: a cache
miss costs no instructions and many cycles, so a path that runs rarely (a traced request under
1 % sampling) costs more time than its count says; the timed benchmarks show that part.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import functools
import gc
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# (route label, app, path): bench_hooks' route, and the sample app's CPU-bound routes
ROUTES = [("/ (gather of 2 tasks)", "hooks", "/"), ("/cache", "sample", "/cache"),
          ("/nested", "sample", "/nested")]  # fmt: skip
VARIANTS = {
    "bare": "bare app",
    "imported": "bare app, the instrumented libraries imported",
    "floor": "a do-nothing middleware (the floor)",
    "idle": "middleware, every instrumentation, untraced",
    "pinned": "the same, hooks on (as after the first traced request)",
    "sampled": "1 % sampled (1 request in 100 traced)",
    "churn": "1 % sampled, hooks taken off after each traced request (hooks_linger=0)",
    "traced": "every request traced, asked by header (trace in the response header)",
}
TARGETS = {"idle": ">= 0.99x", "pinned": ">= 0.99x", "sampled": ">= 0.98x"}
# Latency in instructions, one request at a time: up to the moment the app hands the server its
# response's last chunk (as bench_routes' latency table times it).
LATENCY_VARIANTS = {
    "untraced": "untraced, hooks on",
    "stored": "traced, to the store only",
    "header": "traced, trace in the response header",
    "rare": "traced to the store, each after 49 untraced",
}
# How many untraced requests come before each counted one in the "rare" variant.
RARE_GAP = 49


def _app(kind: str, variant: str) -> Any:
    """The ASGI app a variant serves for one route."""
    from asgi_asynctrace import AsyncTraceMiddleware, install_hooks
    from asgi_asynctrace._hooks import LINGER_S

    from .bench_hooks import PassThrough, endpoint

    if kind == "hooks":
        from starlette.applications import Starlette
        from starlette.routing import Route

        bare: Any = Starlette(routes=[Route("/", endpoint)])
    else:
        from sample_app.app import app as sample

        from .harness import bare_app

        bare = bare_app(sample)
    if variant == "bare":
        return bare
    if variant == "imported":  # what an app that uses every instrumented library has loaded
        _import_instrumented_libraries()
        return bare
    if variant == "floor":
        return PassThrough(bare)
    sampled = variant in ("sampled", "churn")
    app = AsyncTraceMiddleware(bare, log_traces=False, store_size=100,
                               sample_rate=0.5 if sampled else 0.0,
                               hooks_linger=0 if variant == "churn" else LINGER_S)  # fmt: skip
    if variant == "pinned":
        install_hooks()
    return app


def _import_instrumented_libraries() -> None:
    import importlib

    from asgi_asynctrace._instrument import _available, _instrumentation

    for name in _available():
        found = _instrumentation(name)
        if found is not None and found.library:
            with contextlib.suppress(ImportError):
                importlib.import_module(found.library)


async def _serve(app: Any, path: str, n: int, traced: bool) -> None:
    from .harness import one_request

    gate = asyncio.Semaphore(50)

    async def guarded() -> None:
        async with gate:
            await one_request(app, path, traced)

    await asyncio.gather(*(guarded() for _ in range(n)))


async def _work(variant: str, warmup: int, n: int) -> None:
    """What one process runs: every route, warm-up then the counted requests."""
    from asgi_asynctrace import _middleware

    if variant in ("sampled", "churn"):  # exactly one request in 100 traced, evenly spaced
        _middleware._random = itertools.cycle([0.9] * 99 + [0.0]).__next__
    traced = variant == "traced"
    for _, kind, path in ROUTES:
        app = _app(kind, variant)
        await _serve(app, path, warmup, traced)
        # Not counted: every variant starts from a collected heap, frozen, so the collections
        # during the count walk only what its requests made, not the modules each variant
        # happens to have loaded (a full collection now and then would otherwise land inside
        # one variant's count and not another's).
        gc.collect()
        gc.freeze()
        os.getpgrp()  # callgrind cuts its count here ...
        await _serve(app, path, n, traced)
        os.getpgrp()  # ... and here
        gc.unfreeze()


async def count_answers(
    app: Any, path: str, warmup: int, n: int, header: bool = False,
    between: Callable[[], Awaitable[None]] | None = None,
) -> None:  # fmt: skip
    """Serve ``path`` one request at a time, ``warmup`` uncounted, then ``n`` that callgrind
    counts from each request's start (``os.getpgrp()``, which cuts its count) to the moment the
    app hands over the response's last chunk (cut again), so every other part of the dump is
    one request's answer. ``between``: run, uncounted, before each counted request (and once
    before the first)."""
    from .harness import request_scope

    marking = False

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        if marking and message["type"] == "http.response.body" and not message.get("more_body"):
            os.getpgrp()  # the answer is out: the count of this request ends here

    for _ in range(warmup):  # the store full, as in a server that has been up a while
        await app(request_scope(path, header), receive, send)
    if between is not None:
        await between()
    gc.collect()
    gc.freeze()
    for _ in range(n):
        if between is not None:  # not counted: between this request and the last one
            await between()
        marking = True
        os.getpgrp()  # ... and starts here
        await app(request_scope(path, header), receive, send)
        marking = False
    gc.unfreeze()


async def _latency_work(variant: str, warmup: int, n: int) -> None:
    """One request at a time, each counted up to its answer (``count_answers``)."""
    from asgi_asynctrace import AsyncTraceMiddleware, install_hooks

    install_hooks()  # as after a first traced request, for every variant
    for _, kind, path in ROUTES:
        bare = _app(kind, "bare")
        traced = variant in ("stored", "rare")
        app = AsyncTraceMiddleware(bare, log_traces=False, store_size=100,
                                   sample_rate=1.0 if traced else 0.0)  # fmt: skip
        between = None
        if variant == "rare":  # untraced requests, served by the same process, between traced ones
            untraced = AsyncTraceMiddleware(bare, log_traces=False, store_size=100)
            between = functools.partial(_untraced_gap, untraced, path)
        await count_answers(app, path, warmup, n, variant == "header", between)


async def _untraced_gap(app: Any, path: str) -> None:
    """The rare variant's ``RARE_GAP`` untraced requests before each traced one."""
    from .harness import one_request

    for _ in range(RARE_GAP):
        await one_request(app, path, False)


def without_watchdog_thread() -> None:
    """In a worker under callgrind: the blocked-loop watchdog's thread is never started. It
    works by wall-clock time, which valgrind slows some 50-fold: there it would wake and sample
    steps that take a fraction of a millisecond natively, and add its own work to the
    requests' counts. What the watchdog costs on a request's own path (watch and unwatch, each
    step's mark, the gc callback's calls) is still counted; what its thread costs in time, the
    timed benchmarks measure."""
    from asgi_asynctrace import _watchdog

    _watchdog._gc_watch(True)  # the gc callback on, as while the thread is awake
    _watchdog._wake.set()  # as if the thread were awake: watch() starts none


def _callgrind(
    flag: str, variant: str, warmup: int, n: int, scratch: str, models: Sequence[str] = (),
    module: str = "benchmarks.bench_instructions",
) -> str:  # fmt: skip
    """Run one worker process under callgrind; returns the prefix of its dump files.
    ``models``: more callgrind options, such as its cache and branch models (bench_misses);
    ``module``: the benchmark whose worker runs (bench_costs has its own)."""
    out = os.path.join(scratch, f"{flag}-{variant}.out")
    cmd = ["valgrind", "--tool=callgrind", *models, "--dump-before=getpgrp",
           f"--callgrind-out-file={out}", sys.executable, "-m", module,
           f"--{flag}", variant, "--warmup", str(warmup), "-n", str(n)]  # fmt: skip
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed under valgrind:\n{done.stderr[-3000:]}")
    return out


def _events(dump: str) -> dict[str, int]:
    """A dump's totals by event name (Ir, and with the models I1mr, D1mr, Bcm, ...)."""
    lines = Path(dump).read_text().splitlines()
    names = next(line for line in lines if line.startswith("events:")).split()[1:]
    totals = next(line for line in lines if line.startswith("totals:")).split()[1:]
    return dict(zip(names, map(int, totals), strict=False))  # an event never seen: left out


def _total(dump: str) -> int:
    return _events(dump)["Ir"]


def _answers(out: str, n: int) -> list[list[str]]:
    """A latency worker's dumps of its requests' answers, per route. Dump 1 is the start-up to
    the first request; then, per request, its answer (even parts) and what ran between it and
    the next one (odd parts)."""
    firsts = (2 + 2 * n * i for i in range(len(ROUTES)))
    return [[f"{out}.{k}" for k in range(first, first + 2 * n, 2)] for first in firsts]


def _latency_count(variant: str, warmup: int, n: int, scratch: str) -> list[int]:
    """Instructions to the answer per request, per route, for one variant (median request)."""
    out = _callgrind("latency-worker", variant, warmup, n, scratch)
    counts = []
    for dumps in _answers(out, n):
        parts = sorted(_total(dump) for dump in dumps)
        counts.append(parts[len(parts) // 2])
    return counts


def _count(variant: str, warmup: int, n: int, scratch: str) -> list[int]:
    """Instructions per request, per route, for one variant (one process under callgrind)."""
    out = _callgrind("worker", variant, warmup, n, scratch)
    # dump 1 is the start-up; then counted, between, counted, ...
    return [_total(f"{out}.{2 * i + 2}") // n for i in range(len(ROUTES))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke check)")
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--latency-worker", choices=list(LATENCY_VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=600, help=argparse.SUPPRESS)
    parser.add_argument("-n", type=int, default=1000, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker or args.latency_worker:
        import logging

        logging.getLogger("asgi_asynctrace.trace").setLevel(logging.WARNING)
        without_watchdog_thread()
        if args.worker:
            asyncio.run(_work(args.worker, args.warmup, args.n))
        else:
            asyncio.run(_latency_work(args.latency_worker, args.warmup, args.n))
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("needs valgrind (Debian's package valgrind)")
    warmup, n = (300, 300) if args.quick else (600, 1000)
    with tempfile.TemporaryDirectory() as scratch, concurrent.futures.ThreadPoolExecutor(2) as pool:
        jobs = {v: pool.submit(_count, v, warmup, n, scratch) for v in VARIANTS}
        latency_n = 21 if args.quick else 101
        waits = {v: pool.submit(_latency_count, v, 200, latency_n, scratch)
                 for v in LATENCY_VARIANTS}  # fmt: skip
        counts = {v: job.result() for v, job in jobs.items()}
        latency = {v: job.result() for v, job in waits.items()}
    print(
        f"Python {sys.version.split()[0]}, valgrind callgrind; instructions per request, "
        f"{n} requests per route and variant (50 in flight) after {warmup} uncounted\n"
    )
    print("| route | variant | instructions per request | vs bare app "
          "| vs bare app, libraries imported | target |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for i, (label, _, _) in enumerate(ROUTES):
        base, loaded = counts["bare"][i], counts["imported"][i]
        for variant, name in VARIANTS.items():
            got = counts[variant][i]
            # as throughput: the bare app's work over this variant's
            print(f"| {label} | {name} | {got:,} | {base / got:.3f}x | {loaded / got:.3f}x "
                  f"| {TARGETS.get(variant, '-')} |")  # fmt: skip
    print(f"\nLatency in instructions: one request at a time, from its start to the moment the "
          f"app hands the server its response's last chunk; the median of {latency_n} requests "
          "after 200 uncounted, the hooks on in every variant\n")  # fmt: skip
    print("| route | " + " | ".join(LATENCY_VARIANTS.values()) + " | target |")
    print("|---|" + "---|" * (len(LATENCY_VARIANTS) + 1))
    for i, (label, _, _) in enumerate(ROUTES):
        base = latency["untraced"][i]
        cells = [f"{base:,}"] + [f"{latency[v][i]:,} ({latency[v][i] / base:.3f}x)"
                                 for v in ("stored", "header", "rare")]  # fmt: skip
        print(f"| {label} | " + " | ".join(cells) + " | <= 1.25x |")


if __name__ == "__main__":
    main()
