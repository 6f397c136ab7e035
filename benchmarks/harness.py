"""Requests to an ASGI app in process, as the benchmarks make them (no sockets, no server):

    rps, cpu_rps = await measured(app, "/cache", 2_000, traced=True)  # 50 in flight
    ns = await answered(app, "/cache", traced=False)  # one request, until its answer

``bare_app(sample)`` is the sample app's routes without the middleware; ``request_scope`` the
scope every request gets (the flag header when ``traced``).
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Awaitable, Callable
from typing import Any

ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]


def request_scope(path: str, traced: bool) -> dict[str, Any]:
    headers = [(b"host", b"bench"), (b"accept", b"*/*")]
    if traced:
        headers.append((b"x-async-trace", b"1"))
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "headers": headers, "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 8000)}  # fmt: skip


async def one_request(app: ASGIApp, path: str, traced: bool) -> None:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        pass

    await app(request_scope(path, traced), receive, send)


async def answered(app: ASGIApp, path: str, traced: bool) -> int:
    """One request's latency: nanoseconds until the app hands the server the response's last
    body chunk, which a server writes out at once (what runs after that, such as writing a
    trace to its sinks, delays the next request on the loop, not this one's answer)."""
    answered = 0

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        nonlocal answered
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            answered = time.perf_counter_ns()

    start = time.perf_counter_ns()
    await app(request_scope(path, traced), receive, send)
    return (answered or time.perf_counter_ns()) - start


async def throughput(app: ASGIApp, path: str, n: int, traced: bool = False) -> float:
    """Requests per second with 50 in flight."""
    return (await measured(app, path, n, traced))[0]


async def measured(app: ASGIApp, path: str, n: int, traced: bool = False) -> tuple[float, float]:
    """Requests per second of wall-clock time, and per second of this process's CPU time
    (which leaves out the time the machine gave to other processes), with 50 in flight: 50
    clients, each sending its next request when its last is answered, as a load generator's
    connections do. (Until 2026-11-30's eleventh session all n requests were made at once as
    tasks waiting on a semaphore: thousands of pending coroutines that the garbage collector
    went through at each young collection, which no server holds; see HISTORY.md.)"""
    left = n

    async def client() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one_request(app, path, traced)

    gc.collect()  # every variant starts from the same heap, not the last one's garbage
    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(client() for _ in range(min(50, n))))
    return n / (time.perf_counter() - start), n / (time.process_time() - cpu)


def bare_app(sample: Any) -> ASGIApp:
    """The sample app's routes without the middleware."""
    from starlette.applications import Starlette

    from sample_app import patterns

    return Starlette(routes=sample.routes, lifespan=patterns.lifespan)
