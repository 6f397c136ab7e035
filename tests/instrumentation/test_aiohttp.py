"""aiohttp client calls against a real uvicorn server on a loopback port."""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from asgi_asynctrace import analyze, instrument, uninstrument
from tests.helpers import fetches, traced
from tests.servers import free_port, serving

aiohttp: Any = pytest.importorskip("aiohttp")
_module: Any = importlib.import_module("asgi_asynctrace.instrumentation.aiohttp")
trace_config: Any = _module.trace_config


async def ok(request: Request) -> Response:
    await asyncio.sleep(0.005)
    return PlainTextResponse(request.headers.get("x-async-trace-parent", "hello"))


async def redirect(request: Request) -> Response:
    return RedirectResponse("/ok", status_code=302)


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    app = Starlette(routes=[Route("/ok", ok), Route("/redirect", redirect)])
    with serving(app, lifespan="off") as base:
        yield base


def test_a_request_is_a_fetch_with_its_status_and_a_masked_url(upstream: str) -> None:
    async def body() -> None:
        async with aiohttp.ClientSession(trace_configs=[trace_config()]) as session:
            async with session.get(f"{upstream}/ok", params={"token": "s3cret"}) as response:
                assert await response.text() == "hello"
            async with session.get(f"{upstream}/redirect") as response:
                assert response.status == 200

    trace = traced(body)
    first, second = fetches(trace)
    assert first["state"] == "ok" and first["method"] == "GET" and first["status"] == 200
    assert first["url"] == f"{upstream}/ok?token=*" and "s3cret" not in str(first)
    assert isinstance(first["queryDigest"], str)
    assert second["url"] == f"{upstream}/redirect" and second["redirects"] == 1
    fetch = next(r for r in trace.resources if r.type == "fetch")
    assert fetch.settled_at - fetch.created_at >= 5_000_000  # type: ignore[operator]
    # where it was made: the app's own line, not aiohttp's
    site = analyze(trace).times[fetch.async_id]
    assert site.label == f"GET {upstream}/ok?token=*"
    stack = trace.stacks[fetch.stack_id] if fetch.stack_id is not None else ()
    assert any("body @ tests/instrumentation/test_aiohttp.py:" in f for f in stack)


def test_a_refused_connection_settles_as_an_error_with_its_type() -> None:
    port = free_port()  # nothing listens there

    async def body() -> None:
        async with aiohttp.ClientSession(trace_configs=[trace_config()]) as session:
            with pytest.raises(aiohttp.ClientConnectionError):
                await session.get(f"http://127.0.0.1:{port}/")

    (got,) = fetches(traced(body))
    assert got["state"] == "error" and got["error"] == "ClientConnectorError"


def test_the_global_switch_covers_sessions_made_after_it(upstream: str) -> None:
    async def body() -> None:
        async with aiohttp.ClientSession() as session, session.get(f"{upstream}/ok") as response:
            await response.read()

    assert instrument("aiohttp") == {"aiohttp": True}
    try:
        got = fetches(traced(body))
    finally:
        uninstrument("aiohttp")
    assert [(f["url"], f["status"]) for f in got] == [(f"{upstream}/ok", 200)]

    async def configs() -> list[Any]:
        async with aiohttp.ClientSession() as session:
            return list(session.trace_configs)

    # switched off: a session made now is aiohttp's own
    assert not [c for c in asyncio.run(configs()) if _module._start in c.on_request_start]


def test_an_untraced_request_goes_through_the_trace_config_untouched(upstream: str) -> None:
    async def call() -> str:
        session = aiohttp.ClientSession(trace_configs=[trace_config()])
        async with session, session.get(f"{upstream}/ok") as response:
            return str(await response.text())

    assert asyncio.run(call()) == "hello"


def test_toward_an_allowed_host_the_call_carries_the_trace_on(upstream: str) -> None:
    from asgi_asynctrace import current_trace

    seen: list[str] = []

    async def body() -> None:
        trace = current_trace()
        assert trace is not None
        trace.propagate_to["127.0.0.1"] = "1"
        session = aiohttp.ClientSession(trace_configs=[trace_config()])
        async with session, session.get(f"{upstream}/ok") as response:
            seen.append(await response.text())

    trace = traced(body)
    (fetch,) = [r for r in trace.resources if r.type == "fetch"]
    assert seen == [f"{trace.trace_id}:{fetch.async_id}"]  # the upstream saw its parent
    assert trace.annotations_of(fetch.async_id)["propagated"] is True
