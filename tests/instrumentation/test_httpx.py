"""httpx fetches against a real uvicorn server on a loopback port."""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from asgi_asynctrace import instrument, uninstrument
from tests.helpers import fetches, traced
from tests.servers import free_port, serving

# By name: the folder is installed under this name, which mypy cannot follow.
_module: Any = importlib.import_module("asgi_asynctrace.instrumentation.httpx")
TracingTransport: Any = _module.TracingTransport
safe_url: Any = _module.safe_url
_fetch: Any = importlib.import_module("asgi_asynctrace.instrumentation._fetch")


async def ok(request: Request) -> Response:
    return PlainTextResponse("hello upstream")


async def redirect(request: Request) -> Response:
    return RedirectResponse("/ok", status_code=302)


async def slow(request: Request) -> Response:
    await asyncio.sleep(2)
    return PlainTextResponse("late")


async def stream(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            await asyncio.sleep(0.01)
            yield b"x" * 1000

    return StreamingResponse(chunks())


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    app = Starlette(
        routes=[Route("/ok", ok), Route("/redirect", redirect), Route("/slow", slow),
                Route("/stream", stream)]
    )  # fmt: skip
    with serving(app, lifespan="off") as base:
        yield base


def test_each_redirect_hop_is_its_own_fetch_with_status_and_size(upstream: str) -> None:
    async def body() -> None:
        async with httpx.AsyncClient(transport=TracingTransport()) as client:
            r = await client.get(f"{upstream}/redirect?token=abc", follow_redirects=True)
            assert r.text == "hello upstream"

    trace = traced(body)
    hops = fetches(trace)
    assert [h["status"] for h in hops] == [302, 200]
    assert hops[0]["url"] == f"{upstream}/redirect?token=*"
    assert hops[1]["url"] == f"{upstream}/ok"
    assert hops[1]["responseBytes"] == len("hello upstream")
    assert all(h["state"] == "ok" and h["method"] == "GET" for h in hops)
    assert all(r.trigger_id == 1 for r in trace.resources if r.type == "fetch")


def test_a_streamed_body_keeps_the_fetch_open_until_it_is_read(upstream: str) -> None:
    async def body() -> None:
        async with (
            httpx.AsyncClient(transport=TracingTransport()) as client,
            client.stream("GET", f"{upstream}/stream") as response,
        ):
            total = 0
            async for chunk in response.aiter_bytes():
                total += len(chunk)
            assert total == 4000

    trace = traced(body)
    (fetch,) = [r for r in trace.resources if r.type == "fetch"]
    assert fetch.state == "ok" and trace.annotations_of(fetch.async_id)["responseBytes"] == 4000
    assert fetch.settled_at is not None and fetch.settled_at - fetch.created_at >= 30_000_000


def test_a_refused_connection_and_a_timeout_settle_as_errors_with_their_type(
    upstream: str,
) -> None:
    closed = f"http://127.0.0.1:{free_port()}/"

    async def body() -> None:
        async with httpx.AsyncClient(transport=TracingTransport(), timeout=0.2) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get(closed)
            with pytest.raises(httpx.ReadTimeout):
                await client.get(f"{upstream}/slow")

    trace = traced(body)
    assert [(f["state"], f["error"]) for f in fetches(trace)] == [
        ("error", "ConnectError"),
        ("error", "ReadTimeout"),
    ]


def test_the_global_switch_covers_clients_made_after_it(upstream: str) -> None:
    assert instrument("httpx") == {"httpx": True}
    try:

        async def body() -> None:
            async with httpx.AsyncClient() as client:
                assert (await client.get(f"{upstream}/ok")).status_code == 200

        trace = traced(body)
    finally:
        uninstrument("httpx")
    assert [f["status"] for f in fetches(trace)] == [200]
    assert not isinstance(httpx.AsyncClient()._transport, TracingTransport)


def test_mock_transports_work_and_untraced_calls_record_nothing() -> None:
    transport = TracingTransport(httpx.MockTransport(lambda request: httpx.Response(204)))

    async def call() -> int:
        async with httpx.AsyncClient(transport=transport) as client:
            return (await client.get("http://user:pw@api.example/x?q=1")).status_code

    assert asyncio.run(call()) == 204
    trace = traced(call)
    assert fetches(trace) == [
        {"state": "ok", "method": "GET", "url": "http://api.example/x?q=*",
         "queryDigest": _fetch.query_digest(b"q=1"), "status": 204, "responseBytes": 0}
    ]  # fmt: skip


def test_unknown_instrumentation_names_are_refused() -> None:
    with pytest.raises(ValueError, match=r"no instrumentation 'nope'; available: .*httpx"):
        instrument("nope")


def test_safe_url_strips_userinfo_and_masks_every_query_value() -> None:
    url = httpx.URL("https://me:secret@h.example/p?a=1&b=2&a=3")
    assert safe_url(url) == "https://h.example/p?a=*&b=*&a=*"
    assert safe_url(url, mask_query=False) == "https://h.example/p?a=1&b=2&a=3"


def test_a_masked_query_is_told_apart_by_its_digest_which_shows_no_value(upstream: str) -> None:
    async def body() -> None:
        async with httpx.AsyncClient(transport=TracingTransport()) as client:
            for token in ("s3cret-1", "s3cret-1", "s3cret-2"):
                await client.get(f"{upstream}/ok", params={"token": token})
            await client.get(f"{upstream}/ok")  # no query: nothing to tell apart

    got = fetches(traced(body))
    assert [f["url"] for f in got] == [f"{upstream}/ok?token=*"] * 3 + [f"{upstream}/ok"]
    digests = [f.get("queryDigest") for f in got]
    assert digests[0] == digests[1] != digests[2] and digests[3] is None
    assert all(isinstance(d, str) and len(d) == 16 and "s3cret" not in d for d in digests[:3])


def test_an_unmasked_query_needs_no_digest(upstream: str) -> None:
    async def body() -> None:
        transport = TracingTransport(mask_query=False)
        async with httpx.AsyncClient(transport=transport) as client:
            await client.get(f"{upstream}/ok", params={"page": 2})

    (got,) = fetches(traced(body))
    assert got["url"] == f"{upstream}/ok?page=2" and "queryDigest" not in got
