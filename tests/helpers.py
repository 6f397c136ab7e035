"""Shared helpers: run a coroutine on the loop under test, and call ASGI apps in-process.

Set ASYNCTRACE_TEST_LOOP=uvloop to run the whole suite on uvloop instead of asyncio's loop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import httpx

from asgi_asynctrace import AsyncTraceMiddleware, Trace
from asgi_asynctrace._hooks import LINGER_S

T = TypeVar("T")
LOOP = os.environ.get("ASYNCTRACE_TEST_LOOP", "asyncio")


async def _awaited(awaitable: Awaitable[T]) -> T:
    return await awaitable


def run(coro: Awaitable[T]) -> T:
    """Run ``coro`` (or any awaitable: an ASGI app's call) to completion on a fresh loop of the
    kind under test."""
    main: Coroutine[Any, Any, T] = coro if isinstance(coro, Coroutine) else _awaited(coro)
    if LOOP == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


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
    creation stack), is the same. Stacks are walked to a depth, then the tracer's own frames
    are left out: a Python form puts a frame of ours in the chain (``TimedCoroutine.send``, a
    timer's callback), so where a walk reaches its depth (on uvloop, whose loop has no frame to
    stop at) the C form's stack shows one frame more. Where each stack starts must match."""
    assert [record for record, _ in c_form] == [record for record, _ in python_form]
    for (_, ours), (_, theirs) in zip(c_form, python_form, strict=True):
        if ours is not None and theirs is not None:
            assert ours[: len(theirs)] == theirs and len(ours) <= len(theirs) + 1
