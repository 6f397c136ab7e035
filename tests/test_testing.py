"""asgi_asynctrace.testing: what a user's own tests get."""

from __future__ import annotations

import asyncio
import importlib
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from asgi_asynctrace import AnalysisSettings, AsyncTraceMiddleware, Trace
from asgi_asynctrace.testing import (
    assert_at_most,
    assert_concurrent,
    assert_no_findings,
    findings,
    trace_request,
)
from tests.helpers import call, run

TracingTransport: Any = importlib.import_module(
    "asgi_asynctrace.instrumentation.httpx"
).TracingTransport


async def _price(request: Request) -> Response:
    await asyncio.sleep(0.01)
    return PlainTextResponse("1.5")


UPSTREAM = Starlette(routes=[Route("/price/{n}", _price)])


def _client() -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=TracingTransport(httpx.ASGITransport(app=UPSTREAM)), base_url="http://up"
    )


async def together(request: Request) -> Response:
    async with _client() as c:
        got = await asyncio.gather(*(c.get(f"/price/{n}") for n in range(3)))
    return JSONResponse([r.text for r in got])


async def one_by_one(request: Request) -> Response:
    async with _client() as c:
        got = [await c.get(f"/price/{n}") for n in range(3)]
    return JSONResponse([r.text for r in got])


APP = Starlette(routes=[Route("/together", together), Route("/one-by-one", one_by_one)])


def test_a_concurrent_endpoint_passes_and_a_sequential_one_fails_with_the_summary() -> None:
    good = run(trace_request(APP, "GET", "/together"))
    assert_concurrent(good, "fetch", count=3)
    # (a step stretched by a busy CI machine is not what this test is about)
    assert_no_findings(good, settings=AnalysisSettings(blocked_step_ms=10_000, loop_busy_ms=10_000))

    bad = run(trace_request(APP, "GET", "/one-by-one"))
    with pytest.raises(AssertionError, match="ended before the last fetch started"):
        assert_concurrent(bad, "fetch")
    with pytest.raises(AssertionError, match="n-plus-one") as raised:
        assert_no_findings(bad, "n-plus-one")
    assert "critical path" in str(raised.value)  # the report says where the time went
    assert [f.kind for f in findings(bad, "n-plus-one")] == ["n-plus-one"]
    assert findings(bad, "sequential-awaits") == []  # the N+1 is named once, as N+1


def test_assert_at_most_counts_a_type_and_names_what_was_made() -> None:
    from asgi_asynctrace import start_resource

    async def orders(request: Request) -> Response:
        for _ in range(int(request.query_params["lines"])):
            async with start_resource("db-query", statement="select * from lines where id = ?"):
                await asyncio.sleep(0)
        async with start_resource("db-query", statement="select * from orders"):
            pass
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/orders", orders)])
    assert_at_most(run(trace_request(app, "GET", "/orders?lines=1")), "db-query", 2)
    assert_at_most(run(trace_request(app, "GET", "/orders?lines=1")), "fetch", 0)
    many = run(trace_request(app, "GET", "/orders?lines=5"))
    with pytest.raises(AssertionError) as raised:
        assert_at_most(many, "db-query", 2)
    assert str(raised.value) == (
        "GET /orders made 6 db-query, at most 2 allowed:\n"
        "  5 x select * from lines where id = ?\n"
        "  1 x select * from orders"
    )


def test_an_app_that_has_the_middleware_already_gives_one_trace_not_two() -> None:
    wrapped = AsyncTraceMiddleware(APP, log_traces=False)
    trace = run(trace_request(wrapped, "GET", "/together"))
    assert len([r for r in trace.resources if r.type == "fetch"]) == 3
    assert wrapped.store is not None and len(wrapped.store) == 0  # the inner one deferred


def test_the_pytest_fixture_collects_every_trace_of_the_test(
    asynctrace_traces: list[Trace],
) -> None:
    app = AsyncTraceMiddleware(APP, log_traces=False)

    async def two(client: httpx.AsyncClient) -> None:
        await client.get("/together", headers={"X-Async-Trace": "1"})
        await client.get("/together")

    call(app, two)
    assert [t.request["path"] for t in asynctrace_traces] == ["/together"]
