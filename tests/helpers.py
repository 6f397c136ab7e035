"""Shared helpers: run a coroutine on the loop under test, and call ASGI apps in-process.

Set ASYNCTRACE_TEST_LOOP=uvloop to run the whole suite on uvloop instead of asyncio's loop.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_asynctrace import AsyncTraceMiddleware, Resource, Trace
from asgi_asynctrace._analysis import AnalysisSettings, analyze
from asgi_asynctrace._hooks import LINGER_S

T = TypeVar("T")
LOOP = os.environ.get("ASYNCTRACE_TEST_LOOP", "asyncio")
# Where asyncio.eager_task_factory can run at all: on 3.12+, and not on uvloop 0.23 under
# 3.13, whose create_task hands the factory an eager_start it refuses (a TypeError without
# this package anywhere near).
NO_EAGER_TASKS = (
    "eager tasks are new in Python 3.12"
    if sys.version_info < (3, 12)
    else "uvloop cannot run asyncio.eager_task_factory on Python 3.13+"
    if LOOP == "uvloop" and sys.version_info >= (3, 13)
    else ""
)


async def _awaited(awaitable: Awaitable[T]) -> T:
    return await awaitable


def run(coro: Awaitable[T]) -> T:
    """Run ``coro`` (or any awaitable: an ASGI app's call) to completion on a fresh loop of the
    kind under test."""
    main: Coroutine[Any, Any, T] = coro if isinstance(coro, Coroutine) else _awaited(coro)
    if LOOP == "uvloop":
        return run_on_uvloop(main)
    return asyncio.run(main)


def run_on_uvloop(main: Coroutine[Any, Any, T]) -> T:
    """``main`` on a uvloop loop run by asyncio's own runner, as uvloop.run and uvicorn do on
    3.11+ (on 3.10 each has a runner of its own, which a loop callback's stack walks past: so
    there the loop is run by asyncio.run)."""
    import uvloop

    if sys.version_info >= (3, 11):
        return uvloop.run(main)
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        return asyncio.run(main)
    finally:
        asyncio.set_event_loop_policy(None)


def client(app: Any, client_host: str = "127.0.0.1") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(client_host, 50123))
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


def call(app: Any, fn: Callable[[httpx.AsyncClient], Awaitable[T]], host: str = "127.0.0.1") -> T:
    """Run ``fn(client)`` against ``app`` in-process and return what it returns."""

    async def main() -> T:
        async with client(app, host) as c:
            return await fn(c)

    return run(main())


async def _request(
    body: Callable[[], Awaitable[Any]],
    *,
    futures: bool = False,
    traced: bool = True,
    instrument: bool = True,
    linger: float | None = None,
    **settings: Any,
) -> Trace | None:
    """Run ``body`` as the handler of one request through the middleware (made with more
    ``settings``, when given); return its trace."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await body()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    traces: list[Trace] = []
    middleware = AsyncTraceMiddleware(
        app,
        log_traces=False,
        store_size=0,
        record_futures=futures,
        instrument=instrument,
        sinks=[lambda trace, data: traces.append(trace)],
        hooks_linger=LINGER_S if linger is None else linger,
        **settings,
    )
    headers = [(b"x-async-trace", b"1")] if traced else []
    scope = {"type": "http", "method": "GET", "path": "/", "headers": headers,
             "client": ("127.0.0.1", 1)}  # fmt: skip

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        pass

    await middleware(scope, receive, send)
    return traces[0] if traces else None


def traced(body: Callable[[], Awaitable[Any]], futures: bool = False) -> Trace:
    trace = run(_request(body, futures=futures))
    assert trace is not None
    return trace


Recorded = list[tuple[Any, "tuple[str, ...] | None"]]


def assert_recorded_alike(c_form: Recorded, python_form: Recorded) -> None:
    """What the C and the Python forms of a hook recorded, each resource as (its record, its
    creation stack), is the same, stacks included: every walk stops where the loop runs the
    task (asyncio's Handle._run, or on uvloop the plain function outside the task's
    coroutine), the Python form's own frames (``TimedCoroutine.send``) walked past."""
    c_records, python_records = [r for r, _ in c_form], [r for r, _ in python_form]
    assert c_records == python_records, f"C: {c_records}\nPython: {python_records}"
    for (_, ours), (_, theirs) in zip(c_form, python_form, strict=True):
        assert ours == theirs, f"C: {ours}\nPython: {theirs}"


Tree = list[tuple[str, list[Any]]]


OWN_SUITES = frozenset({"timer", "stream-read", "stream-write"})


def label(trace: Trace, res: Resource) -> str:
    notes = trace.annotations_of(res.async_id)
    name = notes.get("coroutine") or notes.get("function") or notes.get("name")
    short = str(name).rsplit(".", 1)[-1] if name else ""
    return f"{res.type}:{short}" if short else res.type


def tree(trace: Trace, parent: int = 1, types: frozenset[str] | None = None) -> Tree:
    """The causality tree under ``parent`` as nested (label, children), in creation order.

    Timers (from the timers instrumentation, on by default) and the response body the
    middleware records are left out unless asked for: their own suites are
    tests/instrumentation/test_timers.py and tests/test_streams.py.
    """
    return [
        (label(trace, r), tree(trace, r.async_id, types))
        for r in trace.resources
        if r.trigger_id == parent and (r.type in types if types else r.type not in OWN_SUITES)
    ]


def untimed(trace: Trace) -> list[Resource]:
    """The trace's resources without its timers and body streams (see ``tree``)."""
    return [r for r in trace.resources if r.type not in OWN_SUITES]


def by_label(trace: Trace, wanted: str) -> list[Resource]:
    return [r for r in trace.resources if label(trace, r) == wanted]


def assert_plausible(trace: Trace) -> None:
    """Every resource's times are ordered: created <= steps (ordered, disjoint) <= settled."""
    end = trace.ended_at
    assert end is not None
    for r in trace.resources:
        times = r.callbacks
        assert times == sorted(times), r
        if times:
            assert r.created_at <= times[0], r
        if r.settled_at is not None:
            assert r.created_at <= r.settled_at, r
            if times and r.type in ("task", "thread"):
                assert times[-1] <= r.settled_at, r
        assert r.trigger_id < r.async_id


async def leaf(delay: float = 0.005) -> str:
    await asyncio.sleep(delay)
    return "leaf"


TracingTransport: Any = importlib.import_module(
    "asgi_asynctrace.instrumentation.httpx"
).TracingTransport


async def _slow(request: Request) -> Response:
    await asyncio.sleep(int(request.query_params.get("ms", "20")) / 1000)
    return PlainTextResponse("ok")


async def _price(request: Request) -> Response:
    await asyncio.sleep(0.005)
    return PlainTextResponse("1.5")


async def price_twice() -> list[str]:
    """A sleep, then the same price fetched twice (once would do) from an upstream served
    in-process: the handler of the tests that serve a framework's app under uvicorn."""
    await asyncio.sleep(0.003)
    prices = Starlette(routes=[Route("/price", _price)])
    transport = TracingTransport(httpx.ASGITransport(app=prices))
    async with httpx.AsyncClient(transport=transport, base_url="http://pricing") as client:
        first = (await client.get("/price")).text
        again = (await client.get("/price")).text
    return [first, again]


def upstream() -> httpx.AsyncClient:
    """A client whose fetches are recorded, to an upstream served in-process."""
    app = Starlette(routes=[Route("/slow", _slow)])
    transport = TracingTransport(httpx.ASGITransport(app=app))
    return httpx.AsyncClient(transport=transport, base_url="http://upstream")


# For tests about other things: a step stretched by a busy machine is no blocked loop there,
# nor a stretch of the request's own code on the critical path.
NO_BLOCKING = AnalysisSettings(
    blocked_step_ms=10_000, loop_busy_ms=10_000, own_code_ms=10_000, own_code_share=1.0
)


def kinds(trace: Trace, settings: AnalysisSettings | None = None) -> list[str]:
    return [f.kind for f in analyze(trace, settings).findings]


def fetches(trace: Trace) -> list[dict[str, object]]:
    """Each fetch of the trace: its state and annotations."""
    return [
        {"state": r.state, **trace.annotations_of(r.async_id)}
        for r in trace.resources
        if r.type == "fetch"
    ]
