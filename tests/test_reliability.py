"""The tracer never breaks, leaks or exposes anything: load, memory, faults, hostile input."""

from __future__ import annotations

import asyncio
import gc
import importlib
import sys
import tracemalloc
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from aiocache import SimpleMemoryCache
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from asgi_asynctrace import (
    AsyncTraceMiddleware,
    Trace,
    _tasks,
    annotate,
    capture_traces,
    failure_counts,
    reset_failures,
    start_resource,
)
from tests.helpers import run
from tests.servers import serving

TracingTransport: Any = importlib.import_module(
    "asgi_asynctrace.instrumentation.httpx"
).TracingTransport
SECRET = "tr4ce-s3cret-value"


async def _price(request: Request) -> Response:
    await asyncio.sleep(0.001)
    return PlainTextResponse(request.path_params["n"])


def busy_app() -> Starlette:
    """Each request does a fetch, cache calls, a timer and thread work, all labelled with n."""
    upstream = Starlette(routes=[Route("/price/{n}", _price)])
    cache = SimpleMemoryCache()

    def in_thread(n: str) -> str:
        annotate("request", n)
        return n

    async def child(n: str) -> str:
        annotate("request", n)
        async with httpx.AsyncClient(transport=TracingTransport(httpx.ASGITransport(app=upstream)),
                                     base_url="http://up") as client:  # fmt: skip
            return (await client.get(f"/price/{n}")).text

    async def work(request: Request) -> Response:
        n = request.query_params["n"]
        annotate("request", n)
        await cache.set(f"k{n}", n, ttl=5)
        cached = await cache.get(f"k{n}")
        await asyncio.sleep(0.001)
        fetched, threaded = await asyncio.gather(child(n), asyncio.to_thread(in_thread, n))
        return JSONResponse({"n": n, "cached": cached, "fetched": fetched, "thread": threaded})

    return Starlette(routes=[Route("/work", work)])


@pytest.fixture
def server() -> Iterator[tuple[str, list[Trace]]]:
    traces: list[Trace] = []
    app = AsyncTraceMiddleware(busy_app(), log_traces=False, sinks=[lambda t, d: traces.append(t)])
    with serving(app) as base:
        yield base, traces


def test_1000_concurrent_requests_each_trace_holds_only_its_own_work(
    server: tuple[str, list[Trace]],
) -> None:
    base, traces = server
    bare = busy_app()

    async def main() -> list[tuple[int, bool, httpx.Response]]:
        gate = asyncio.Semaphore(50)
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:

            async def one(n: int) -> tuple[int, bool, httpx.Response]:
                traced = n % 2 == 0
                async with gate:
                    headers = {"X-Async-Trace": "1"} if traced else {}
                    return n, traced, await client.get(f"/work?n={n}", headers=headers)

            return await asyncio.gather(*(one(n) for n in range(1000)))

    results = asyncio.run(main())
    assert all(r.status_code == 200 for _, _, r in results)

    async def reference(n: int) -> httpx.Response:
        transport = httpx.ASGITransport(app=bare)
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
            return await client.get(f"/work?n={n}")

    async def references() -> dict[int, httpx.Response]:
        untraced = [n for n, traced, _ in results if not traced]
        return dict(zip(untraced, await asyncio.gather(*map(reference, untraced)), strict=True))

    alone = run(references())
    for n, traced, response in results:
        assert ("x-async-trace-id" in response.headers) == traced
        if not traced:  # untraced: exactly what the app alone answers
            assert response.content == alone[n].content
            assert response.headers["content-type"] == alone[n].headers["content-type"]
            assert response.headers["content-length"] == alone[n].headers["content-length"]
    assert len(traces) == 500
    for trace in traces:
        labels = {v for _, k, v in trace.annotations if k == "request"}
        assert len(labels) == 1, labels  # root, child task and thread job: one request only
        (label,) = labels
        assert trace.request["path"] == "/work" and int(str(label)) % 2 == 0
        kinds = {r.type for r in trace.resources}
        assert {"task", "thread", "fetch", "timer", "cache-get", "cache-put"} <= kinds
    assert failure_counts() == {}


def _scope(
    path: str = "/", client: str = "127.0.0.1", value: bytes | None = b"1"
) -> dict[str, Any]:
    headers = [(b"x-async-trace", value)] if value is not None else []
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
            "scheme": "http", "path": path, "raw_path": path.encode("utf-8", "replace"),
            "query_string": b"", "root_path": "", "headers": headers,
            "client": (client, 1234), "server": ("127.0.0.1", 80)}  # fmt: skip


async def _call(app: Any, scope: dict[str, Any]) -> tuple[int, bytes]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        sent.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body


def test_10000_traced_requests_keep_memory_flat_and_leave_nothing_alive() -> None:
    async def endpoint(request: Request) -> Response:
        await asyncio.gather(asyncio.sleep(0), asyncio.sleep(0))
        return PlainTextResponse("ok")

    app = AsyncTraceMiddleware(Starlette(routes=[Route("/", endpoint)]), log_traces=False,
                               store_size=100)  # fmt: skip

    async def burst(n: int) -> None:
        for _ in range(n):
            assert await _call(app, _scope()) == (200, b"ok")

    async def main() -> tuple[int, int]:
        await burst(2000)  # the store is full from here on
        gc.collect()
        tracemalloc.start()
        first = tracemalloc.get_traced_memory()[0]
        await burst(8000)
        gc.collect()
        last = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        return first, last

    first, last = run(main())
    assert last - first < 2_000_000, f"grew {last - first} bytes over 8000 traced requests"
    assert app.store is not None and len(app.store) == 100

    def alive() -> list[object]:
        gc.collect()
        return [o for o in gc.get_objects() if isinstance(o, (Trace, _tasks.TimedCoroutine))]

    # the store keeps the last 100 traces as they are (nothing has read them), nothing else
    # (and on uvloop one trace of the cache tests: a pooled Redis connection opened inside
    # a traced request keeps that request's context, see the README's known gaps)
    stored = {summary["traceId"] for summary in app.store.summaries()}
    kept = alive()
    assert all(isinstance(o, Trace) for o in kept), kept
    assert {o.trace_id for o in kept if isinstance(o, Trace)} >= stored and len(stored) == 100
    assert len(kept) <= 101, kept
    del kept
    for trace_id in stored:  # reading one turns it into its JSON bytes
        assert app.store.get(trace_id) is not None
    assert len(alive()) <= 1, alive()


def test_a_request_making_100000_resources_hits_the_cap_and_counts_what_it_dropped() -> None:
    async def endpoint(request: Request) -> Response:
        for _ in range(100_000):
            with start_resource("cache-get"):
                pass
        return PlainTextResponse("done")

    app = AsyncTraceMiddleware(Starlette(routes=[Route("/", endpoint)]), log_traces=False)
    with capture_traces() as traces:
        assert run(_call(app, _scope())) == (200, b"done")
    (trace,) = traces
    assert len(trace.resources) == trace.limits.max_resources == 20_000
    # the root is one of the 20,000; the response body's stream-write came after the cap too
    assert trace.dropped.resources == 100_000 - 20_000 + 1 + 1
    assert b'"dropped":{"resources":80002' in trace.to_json()


def test_a_hook_that_fails_leaves_the_app_alone_and_tracing_recovers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def endpoint(request: Request) -> Response:
        values = await asyncio.gather(asyncio.sleep(0, "a"), asyncio.sleep(0, "b"))
        return PlainTextResponse("".join(values))

    app = AsyncTraceMiddleware(Starlette(routes=[Route("/", endpoint)]), log_traces=False)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the tracer's own bug")

    monkeypatch.setattr(Trace, "new_resource", broken)  # every hook's way to a new resource
    with capture_traces() as traces:
        assert run(_call(app, _scope())) == (200, b"ab")
    assert failure_counts()["task-factory"] == 2  # counted; logged once
    assert [r.type for r in traces[0].resources if r.type == "task"] == []
    monkeypatch.undo()
    reset_failures()
    with capture_traces() as traces:
        assert run(_call(app, _scope())) == (200, b"ab")
    assert len([r for r in traces[0].resources if r.type == "task"]) == 2
    assert failure_counts() == {}


def test_a_closed_stderr_never_reaches_the_app(monkeypatch: pytest.MonkeyPatch) -> None:
    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("still fine")

    app = AsyncTraceMiddleware(Starlette(routes=[Route("/", endpoint)]))
    closed = open(__file__)  # noqa: SIM115 - closed on purpose
    closed.close()
    monkeypatch.setattr(sys, "stderr", closed)
    for _ in range(2):
        assert run(_call(app, _scope())) == (200, b"still fine")


def _plain_app() -> Any:
    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("app")

    return Starlette(routes=[Route("/{path:path}", endpoint)])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=st.binary(max_size=300), remote=st.booleans())
def test_any_header_value_is_served_and_remote_clients_never_get_a_trace(
    value: bytes, remote: bool
) -> None:
    app = AsyncTraceMiddleware(_plain_app(), log_traces=False)
    client = "203.0.113.9" if remote else "127.0.0.1"
    with capture_traces() as traces:
        status, body = run(_call(app, _scope("/x", client, value)))
    assert (status, body) == (200, b"app")
    if remote:
        assert traces == []


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rest=st.text(max_size=60), remote=st.booleans(), header=st.booleans())
def test_any_path_under_the_store_prefix_is_answered_cleanly(
    rest: str, remote: bool, header: bool
) -> None:
    app = AsyncTraceMiddleware(_plain_app(), log_traces=False)
    client = "203.0.113.9" if remote else "127.0.0.1"
    scope = _scope("/__asynctrace" + rest, client, b"1" if header else None)
    status, body = run(_call(app, scope))
    assert status in (200, 404, 405)
    if remote:  # nothing of the store or the viewer reaches a remote client: the app answers
        assert (status, body) == run(_call(_plain_app(), scope))


def test_with_a_secret_only_the_secret_opens_the_store_and_the_viewer() -> None:
    app = AsyncTraceMiddleware(_plain_app(), log_traces=False, secret=SECRET)
    remote = "203.0.113.9"
    assert run(_call(app, _scope("/__asynctrace/", remote, b"wrong"))) == (200, b"app")
    status, body = run(_call(app, _scope("/__asynctrace/", remote, SECRET.encode())))
    assert status == 200 and body.startswith(b"<!doctype html>")
    status, body = run(_call(app, _scope("/__asynctrace/traces", remote, SECRET.encode())))
    assert status == 200 and body.startswith(b'{"traces"')


def test_credentials_in_headers_query_and_urls_never_reach_a_trace() -> None:
    upstream = _plain_app()

    async def endpoint(request: Request) -> Response:
        transport = TracingTransport(httpx.ASGITransport(app=upstream))
        async with httpx.AsyncClient(transport=transport) as client:
            await client.get(f"http://user:{SECRET}@up/api?token={SECRET}")
        return PlainTextResponse("ok")

    app = AsyncTraceMiddleware(Starlette(routes=[Route("/", endpoint)]), log_traces=False)
    scope = _scope("/")
    scope["query_string"] = f"token={SECRET}".encode()
    scope["headers"] += [(b"authorization", f"Bearer {SECRET}".encode()),
                         (b"cookie", f"session={SECRET}".encode())]  # fmt: skip
    with capture_traces() as traces:
        assert run(_call(app, scope)) == (200, b"ok")
    data = traces[0].to_json().decode()
    assert SECRET not in data
    assert "http://up/api?token=*" in data


def test_a_database_that_is_down_fails_the_request_as_ever_and_the_trace_says_so() -> None:
    import asyncpg

    async def endpoint(request: Request) -> Response:
        await asyncpg.connect("postgresql://postgres@127.0.0.1:1/test", timeout=2)
        return PlainTextResponse("unreachable")

    app = AsyncTraceMiddleware(Starlette(routes=[Route("/", endpoint)]), log_traces=False)
    bare = Starlette(routes=[Route("/", endpoint)])
    with capture_traces() as traces, pytest.raises(OSError) as traced_error:
        run(_call(app, _scope()))
    with pytest.raises(OSError) as bare_error:
        run(_call(bare, _scope()))
    assert type(traced_error.value) is type(bare_error.value)
    (trace,) = traces
    assert trace.root.state == "error"
    assert trace.annotations_of(1)["error"] == type(traced_error.value).__qualname__
