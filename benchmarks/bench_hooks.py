"""Overhead of the middleware and the asyncio hooks, as ratios measured in one run.

    python -m benchmarks.bench_hooks            # prints a Markdown table
    python -m benchmarks.bench_hooks --quick    # fewer rounds, for a smoke check

In-process ASGI calls (no sockets), so the numbers are stable: every variant serves the
same Starlette route, each round interleaves the variants 100 requests at a time, times are
this process's CPU time, and each figure is a median of rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_asynctrace import (
    AsyncTraceMiddleware,
    Trace,
    start_resource,
    uninstall_hooks,
)
from asgi_asynctrace._context import ACTIVE, new_resource
from asgi_asynctrace._stacks import ACCELERATED

ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]


async def _child() -> int:
    await asyncio.sleep(0)
    return 1


async def endpoint(request: Request) -> Response:
    values = await asyncio.gather(_child(), _child())
    return PlainTextResponse(str(sum(values)))


class PassThrough:
    """The cheapest possible ASGI middleware: the floor for any middleware's overhead."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


def make_app(middleware: type[PassThrough] | type[AsyncTraceMiddleware] | None) -> ASGIApp:
    app = Starlette(routes=[Route("/", endpoint)])
    if middleware is AsyncTraceMiddleware:
        app.add_middleware(AsyncTraceMiddleware, log_traces=False)
    elif middleware is PassThrough:
        app.add_middleware(PassThrough)
    return app


async def serve(app: ASGIApp, n: int, traced: bool = False) -> float:
    """CPU seconds to serve ``n`` sequential requests."""
    headers = [(b"host", b"bench"), (b"accept", b"*/*"), (b"user-agent", b"bench")]
    if traced:
        headers.append((b"x-async-trace", b"1"))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "GET", "scheme": "http", "path": "/", "raw_path": b"/",
             "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}  # fmt: skip

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        pass

    # CPU time of this process: these requests never wait, so it is their cost, without the
    # time the shared machine gave to other processes
    start = time.process_time()
    for _ in range(n):
        await app(dict(scope), receive, send)
    return time.process_time() - start


async def request_overhead(rounds: int, n: int) -> dict[str, float]:
    """Throughput ratios of the variants against the bare app, in one process, in phases.

    Hooks off (as before any traced request): the bare app, a do-nothing middleware and the
    idle middleware. Hooks on (as after a process's first traced request, for good): the bare
    app again (its own tasks and futures pass through the hooks' C dispatchers too, as every
    app in the process does), the middleware untraced, and traced requests. The two phases
    alternate three times, each after an untimed warm-up: putting the hooks on and off around
    every chunk would time CPython re-learning the loop's lookups, which a process pays once.
    Within a phase each round serves ``n`` requests per variant in chunks of 100, interleaved
    chunk by chunk (each first in turn), so a slow patch of the machine hits them all; times
    are this process's CPU time. (Separate processes per variant were tried: two processes
    running the same app differ by up to 15 % here, more than any effect measured.)
    """
    bare, floor, with_mw = make_app(None), make_app(PassThrough), make_app(AsyncTraceMiddleware)

    async def traced(k: int) -> float:  # a quarter as many, scaled: traced ones cost more
        return await serve(with_mw, k // 4, traced=True) * 4

    before: dict[str, list[float]] = {"bare": [], "floor": [], "idle": []}
    after: dict[str, list[float]] = {"bare": [], "pinned": []}
    with_traced: dict[str, list[float]] = {"bare": [], "traced": []}
    effect: list[float] = []  # the bare app with the hooks on vs off, phase by phase
    turns = 3  # the phases alternate, so a drift of the machine does not pass for an effect
    for _ in range(turns):
        share = max(1, rounds // turns)
        uninstall_hooks()
        for app in (bare, floor, with_mw):
            await serve(app, 500)  # lookups re-learned, untimed
        off = await _interleaved(share, n, {
            "bare": lambda k: serve(bare, k),
            "floor": lambda k: serve(floor, k),
            "idle": lambda k: serve(with_mw, k),
        })  # fmt: skip
        await serve(with_mw, 50, traced=True)  # the hooks go on, and stay
        for app in (bare, with_mw):
            await serve(app, 500)
        on = await _interleaved(share, n, {
            "bare": lambda k: serve(bare, k),
            "pinned": lambda k: serve(with_mw, k),
        })  # fmt: skip
        # apart: what traced requests leave behind (garbage, cold caches) would otherwise
        # slow whichever untraced chunk comes next
        tr = await _interleaved(share, n, {"bare": lambda k: serve(bare, k), "traced": traced})
        for took, got in ((before, off), (after, on), (with_traced, tr)):
            for name, times in got.items():
                took[name] += times
        effect.append(statistics.median(off["bare"]) / statistics.median(on["bare"]))
    uninstall_hooks()

    def ratio(took: dict[str, list[float]], name: str) -> float:  # throughput vs the bare app
        return statistics.median(b / x for b, x in zip(took["bare"], took[name], strict=True))

    return {
        "floor": ratio(before, "floor"),
        "idle": ratio(before, "idle"),
        "pinned": ratio(after, "pinned"),
        "hooks": statistics.median(effect),
        "traced": 1 / ratio(with_traced, "traced"),  # latency
    }


async def _interleaved(
    rounds: int, n: int, variants: dict[str, Callable[[int], Awaitable[float]]]
) -> dict[str, list[float]]:
    """CPU seconds per round for each variant, chunks of 100 interleaved."""
    names = list(variants)
    took: dict[str, list[float]] = {name: [] for name in names}
    chunk = 100
    for r in range(rounds):
        this = dict.fromkeys(names, 0.0)
        gc.collect()
        for c in range(max(1, n // chunk)):
            k = r + c
            for name in names[k % len(names) :] + names[: k % len(names)]:
                this[name] += await variants[name](chunk)
        for name in names:
            took[name].append(this[name])
    return took


async def middleware_cost(rounds: int) -> float:
    """Nanoseconds the idle middleware adds to a request over a do-nothing middleware, both
    around an app that does nothing: its own cost, without any app's noise around it."""

    async def nothing(scope: Any, receive: Any, send: Any) -> None:
        return None

    idle = AsyncTraceMiddleware(nothing, log_traces=False, instrument=False)
    floor = PassThrough(nothing)
    headers = [(b"host", b"bench"), (b"accept", b"*/*"), (b"user-agent", b"bench")]
    scope = {"type": "http", "path": "/", "client": ("127.0.0.1", 5000), "headers": headers}
    diffs = []
    for _ in range(rounds):
        took = {}
        for name, app in (("floor", floor), ("idle", idle)):
            start = time.perf_counter_ns()
            for _ in range(20_000):
                await app(scope, None, None)  # type: ignore[arg-type]
            took[name] = (time.perf_counter_ns() - start) / 20_000
        diffs.append(took["idle"] - took["floor"])
    return statistics.median(diffs)


async def _noop() -> None:
    return None


async def _steps(k: int) -> None:
    for _ in range(k):
        await asyncio.sleep(0)


# How many coroutine frames the measured work runs under, so that every creation stack is
# walked to the default depth cap (16 frames) as in a real app, not 3 frames from the loop.
DEPTH = 16


async def _nested(k: int, work: Callable[[], Awaitable[None]]) -> float:
    if k:
        return await _nested(k - 1, work)
    start = time.perf_counter_ns()
    await work()
    return float(time.perf_counter_ns() - start)


async def _timed(traced: bool, work: Callable[[], Awaitable[None]]) -> float:
    token = None
    release = None
    if traced:
        from asgi_asynctrace._hooks import acquire_hooks

        trace = Trace.start()
        release = acquire_hooks(asyncio.get_running_loop())
        token = ACTIVE.set((trace, trace.root))
    try:
        return await _nested(DEPTH, work)
    finally:
        if token is not None:
            ACTIVE.reset(token)
        if release is not None:
            release()


async def _step_cost(steps: int) -> float:
    """A step of a recorded task over one of the same task unrecorded: the same coroutine run
    by a task bare and through ``TimedCoroutine`` (what the task factory gives a traced task),
    in turn, on a loop of its own. Taken directly: as a difference of whole traced and
    untraced runs it came out below their noise, even negative, and on the loop that had run
    those, the bare task ran slower than on a fresh one (not understood; measured apart)."""
    from asgi_asynctrace._tasks import TimedCoroutine

    loop = asyncio.get_running_loop()
    trace = Trace.start()
    took: dict[bool, list[int]] = {False: [], True: []}
    for timed in (False, True, True, False):  # each first in turn
        coro: Any = _steps(steps)
        res = trace.new_resource("task", trace.root, 0)
        if timed and res is not None:
            coro = TimedCoroutine(coro, trace, res)
        gc.collect()
        start = time.perf_counter_ns()
        await loop.create_task(coro)
        took[timed].append(time.perf_counter_ns() - start)
    return (sum(took[True]) - sum(took[False])) / 2 / steps


async def _step_costs(rounds: int, steps: int) -> list[float]:
    return [await _step_cost(steps) for _ in range(rounds)]


async def record_costs(rounds: int, n: int) -> dict[str, float]:
    """Median extra ns per created task (with its stack), resource and start_resource block."""

    async def tasks() -> None:
        await asyncio.gather(*[asyncio.create_task(_noop()) for _ in range(n)])

    async def scopes() -> None:
        for _ in range(n):
            with start_resource("cache-get"):
                pass

    async def records() -> None:
        active = ACTIVE.get()
        for _ in range(n):
            if active is not None:
                new_resource("cache-get", active[0], active[1])

    per_task: list[float] = []
    per_resource: list[float] = []
    per_scope: list[float] = []
    for _ in range(rounds):
        per_scope.append((await _timed(True, scopes) - await _timed(False, scopes)) / n)
        per_resource.append((await _timed(True, records) - await _timed(False, records)) / n)
        base_tasks = await _timed(False, tasks)
        traced_tasks = await _timed(True, tasks)
        per_task.append((traced_tasks - base_tasks) / n)
    return {
        "resource": statistics.median(per_resource),
        "scope": statistics.median(per_scope),
        "task": statistics.median(per_task),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke check)")
    args = parser.parse_args()
    rounds, n = (3, 300) if args.quick else (25, 2000)
    overhead = asyncio.run(request_overhead(rounds, n))
    own = asyncio.run(middleware_cost(rounds))
    per_trace = 1000 if args.quick else 2000
    costs = asyncio.run(record_costs(rounds, per_trace))
    costs["step"] = statistics.median(asyncio.run(_step_costs(rounds, per_trace // 2)))
    accelerator = "C stack walk" if ACCELERATED else "pure-Python stack walk"
    print(
        f"Python {sys.version.split()[0]} ({accelerator}), {rounds} rounds of {n} requests; "
        f"costs measured on traces of {per_trace} resources with stacks {DEPTH} frames deep; "
        "medians\n"
    )
    print("| measure | result | target |")
    print("|---|---|---|")
    print(
        f"| untraced throughput, a do-nothing ASGI middleware vs bare app (the floor) "
        f"| {overhead['floor']:.3f}x | - |"
    )
    print(
        f"| untraced throughput, middleware idle vs bare app | {overhead['idle']:.3f}x | >= 0.99x |"
    )
    print(
        f"| the idle middleware's own cost per request, over a do-nothing middleware "
        f"| {own:.0f} ns | - |"
    )
    print(
        f"| hooks on (as after the first traced request): untraced throughput, middleware vs "
        f"bare app | {overhead['pinned']:.3f}x | >= 0.99x |"
    )
    print(
        f"| hooks on: the bare app's own throughput vs hooks off (the phases alternated) "
        f"| {overhead['hooks']:.3f}x | - |"
    )
    print(
        f"| traced request latency vs bare app (3 tasks, 2 futures) "
        f"| {overhead['traced']:.2f}x | - |"
    )
    print(
        f"| cost per recorded resource (clock, cached creation stack, record) "
        f"| {costs['resource']:.0f} ns | <= 1500 ns |"
    )
    print(
        f"| cost per `start_resource` block (the above, plus annotations, context switch "
        f"in and out, settle) | {costs['scope']:.0f} ns | - |"
    )
    print(
        f"| cost per recorded task (resource, stack, wrapper, context, 2 steps) "
        f"| {costs['task']:.0f} ns | - |"
    )
    print(f"| cost per recorded task step | {costs['step']:.0f} ns | - |")


if __name__ == "__main__":
    main()
