"""Where a traced request's extra instructions go: its own set-up, then each kind of resource.

    python -m benchmarks.bench_costs            # a Markdown table (needs valgrind)
    python -m benchmarks.bench_costs --quick    # fewer requests, for a smoke check

bench_instructions counts what a traced request costs in all; this takes that count apart, so
that the cost of tracing a route can be told from what the route does. Each variant below runs
in its own process under callgrind and serves two routes one request at a time, counted from a
request's start to the moment the app hands the server its last body chunk (as bench_instructions'
latency table): a route that makes no resource at all (``/ok``: a plain-text response), which
gives the cost of a traced request as such, and the sample app's ``/cache``, where every
resource is CPU and nothing waits. The variants turn parts of the recording on one at a time
(library instrumentation, futures, creation stacks), and each part's cost is the difference
between two of them; the resources a ``/cache`` trace holds are counted in this process, from a
trace made the same way. Instructions, not time: bench_misses and bench_routes show how much
longer the tracer's instructions take than the app's.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import shutil
import sys
import tempfile
from typing import Any

from .bench_instructions import _callgrind, _total, count_answers, without_watchdog_thread

PATHS = ["/ok", "/cache"]
# name: (traced, the instrumentation turned on, futures recorded, stack depth)
VARIANTS: dict[str, tuple[bool, list[str] | None, bool, int]] = {
    "untraced-plain": (False, [], True, 16),
    "plain-nofutures": (True, [], False, 16),
    "plain": (True, [], True, 16),
    "timers": (True, ["timers"], True, 16),
    "aiocache": (True, ["aiocache"], True, 16),
    "full": (True, None, True, 16),
    "nostacks": (True, None, True, 0),
    "nowatchdog": (True, None, True, 16),  # as full, with blocked_sample_ms=None
    "untraced": (False, None, True, 16),
}


def _app(variant: str, path: str) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    import asgi_asynctrace
    from asgi_asynctrace import AsyncTraceMiddleware, TraceLimits

    from .harness import bare_app

    traced, instrument, futures, depth = VARIANTS[variant]
    if path == "/ok":

        async def ok(request: Request) -> Response:
            return PlainTextResponse("ok")

        bare: Any = Starlette(routes=[Route("/ok", ok)])
    else:
        from sample_app.app import app as sample

        bare = bare_app(sample)
    asgi_asynctrace.uninstrument()  # then only what this variant asks for
    return AsyncTraceMiddleware(
        bare, log_traces=False, store_size=100, sample_rate=1.0 if traced else 0.0,
        instrument=True if instrument is None else (instrument or False),
        record_futures=futures, limits=TraceLimits(max_stack_depth=depth),
        blocked_sample_ms=None if variant == "nowatchdog" else 20.0,
    )  # fmt: skip


async def _work(variant: str, warmup: int, n: int) -> None:
    """One request at a time, each counted up to its answer (as bench_instructions' latency
    worker: ``count_answers``)."""
    from asgi_asynctrace import install_hooks

    install_hooks()  # as after a first traced request, in every variant
    for path in PATHS:
        await count_answers(_app(variant, path), path, warmup, n)


def _counts(variant: str, warmup: int, n: int, scratch: str) -> list[int]:
    """Instructions up to the answer, per path: the median of the counted requests."""
    out = _callgrind("worker", variant, warmup, n, scratch, module="benchmarks.bench_costs")
    medians = []
    for i in range(len(PATHS)):  # dump 1: start-up; then per request its answer, the rest
        first = 2 + 2 * n * i
        parts = sorted(_total(f"{out}.{k}") for k in range(first, first + 2 * n, 2))
        medians.append(parts[len(parts) // 2])
    return medians


async def _kinds() -> tuple[collections.Counter[str], int]:
    """The resources of a traced ``/cache`` request by type, and its creation stacks."""
    from asgi_asynctrace import capture_traces

    from .harness import one_request

    app = _app("full", "/cache")
    with capture_traces() as traces:
        for _ in range(3):
            await one_request(app, "/cache", False)
    trace = traces[-1]
    return collections.Counter(r.type for r in trace.resources), len(trace.stacks)


def parts(
    c: dict[str, dict[str, int]], kinds: collections.Counter[str]
) -> tuple[list[tuple[str, int, int | None]], int, int]:
    """The rows of the table from each variant's count per path (``c[variant][path]``): each
    part's instructions and how many resources it is for; then ``/cache``'s untraced count,
    and the extra a traced request costs over it, which the parts add up to."""
    ok, cache = "/ok", "/cache"
    setup = c["plain-nofutures"][ok] - c["untraced-plain"][ok]
    tasks = c["plain-nofutures"][cache] - c["untraced-plain"][cache] - setup
    cache_calls = sum(kinds[k] for k in kinds if k.startswith("cache-"))
    untraced = c["untraced"][cache]
    extra = c["full"][cache] - untraced
    rows: list[tuple[str, int, int | None]] = [
        ("a traced request as such: the trace, its root, the response body's `stream-write`, "
         "the request handed to the app and back (on `/ok`, which makes no resource)", setup,
         None),
        (f"tasks ({kinds['task']}), each with its steps and creation stack; the root's steps "
         "between them", tasks, kinds["task"]),
        (f"futures ({kinds['future']}), each with its creation stack",
         c["plain"][cache] - c["plain-nofutures"][cache], kinds["future"]),
        (f"timers ({kinds['timer']}): the `timers` instrumentation",
         c["timers"][cache] - c["plain"][cache], kinds["timer"]),
        (f"aiocache calls ({cache_calls}): the `aiocache` instrumentation",
         c["aiocache"][cache] - c["plain"][cache], cache_calls),
        ("the two instrumentations together, over each on its own",
         c["full"][cache] - c["timers"][cache] - c["aiocache"][cache] + c["plain"][cache], None),
        ("less what the untraced request pays too: the instrumentation's patches on its way",
         c["untraced-plain"][cache] - untraced, None),
    ]  # fmt: skip
    return rows, untraced, extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke check)")
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=200, help=argparse.SUPPRESS)
    parser.add_argument("-n", type=int, default=41, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import logging

        logging.getLogger("asgi_asynctrace.trace").setLevel(logging.WARNING)
        without_watchdog_thread()
        asyncio.run(_work(args.worker, args.warmup, args.n))
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("needs valgrind (Debian's package valgrind)")
    n = 11 if args.quick else 41
    kinds, stacks = asyncio.run(_kinds())
    with tempfile.TemporaryDirectory() as scratch, concurrent.futures.ThreadPoolExecutor(2) as pool:
        jobs = {v: pool.submit(_counts, v, 200, n, scratch) for v in VARIANTS}
        c = {v: dict(zip(PATHS, job.result(), strict=True)) for v, job in jobs.items()}
    rows, untraced, extra = parts(c, kinds)
    cache = "/cache"
    print(f"Python {sys.version.split()[0]}, valgrind callgrind; one request at a time, up to "
          f"its answer, the hooks on, the median of {n} after 200 uncounted. `/cache` untraced: "
          f"{untraced:,} instructions; traced: {c['full'][cache]:,} "
          f"({c['full'][cache] / untraced:.3f}x), {sum(kinds.values())} resources, "
          f"{stacks} creation stacks\n")  # fmt: skip
    print("| part of a traced `/cache` request | instructions | each | share of the extra |")
    print("|---|---|---|---|")
    for label, count, items in rows:
        each = f"{count / items:,.0f}" if items else "-"
        print(f"| {label} | {count:,} | {each} | {100 * count / extra:.0f} % |")
    depth = c["full"][cache] - c["nostacks"][cache]
    print(
        f"| of all the above, the {stacks} creation stacks (walked, looked up; "
        f"`TraceLimits(max_stack_depth=0)` turns them off) | {depth:,} "
        f"| {depth / stacks:,.0f} | {100 * depth / extra:.0f} % |"
    )
    watchdog = c["full"][cache] - c["nowatchdog"][cache]
    print(
        "| of all the above, the blocked-loop watchdog on the request's path (watch and unwatch,"
        " each step's mark; `blocked_sample_ms=None` "
        f"turns it off) | {watchdog:,} | - | {100 * watchdog / extra:.0f} % |"
    )
    print(f"| **all: a traced request over an untraced one** | **{extra:,}** | - | 100 % |")


if __name__ == "__main__":
    main()
