"""What a real server does inside the app's ``send`` is the server's work, not the request's."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from asgi_asynctrace import AsyncTraceMiddleware, Trace, capture_traces
from tests.servers import serving


async def hello(request: Request) -> Response:
    return PlainTextResponse("hello")


async def chunks(request: Request) -> Response:
    async def body() -> Any:
        for part in (b"a", b"b", b"c"):
            yield part

    return StreamingResponse(body())


def _wait_for(traces: list[Trace], n: int) -> None:
    """A trace ends after its response is out (the server finishes the request after the
    client has the answer): wait for ``n``."""
    deadline = time.monotonic() + 5
    while len(traces) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(traces) == n


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_the_servers_keep_alive_timer_is_not_the_requests(http: str) -> None:
    app = AsyncTraceMiddleware(
        Starlette(routes=[Route("/hello", hello), Route("/chunks", chunks)]), log_traces=False
    )
    with (
        serving(app, http=http) as base,
        capture_traces() as traces,
        httpx.Client(base_url=base) as client,  # one kept-alive connection
    ):
        for path in ("/hello", "/chunks", "/hello"):
            got = client.get(path, headers={"X-Async-Trace": "1"})
            assert got.status_code == 200
        _wait_for(traces, 3)
    for trace in traces:
        timers = [r for r in trace.resources if r.type == "timer"]
        assert timers == [], [trace.annotations_of(r.async_id) for r in timers]
        # the response body's writes are still the request's: recorded, the last one too
        writes = [r for r in trace.resources if r.type == "stream-write"]
        assert len(writes) == 1 and writes[0].state == "ok"
        assert trace.annotations_of(writes[0].async_id)["bytes"] == (
            5 if trace.request["path"] == "/hello" else 3
        )
        assert trace.root.state == "ok"


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    text = await websocket.receive_text()
    await websocket.send_text(text.upper())
    await websocket.close()


def test_the_servers_websocket_pings_are_not_the_requests() -> None:
    import websockets.sync.client

    app = AsyncTraceMiddleware(Starlette(routes=[WebSocketRoute("/ws", echo)]), log_traces=False)
    with serving(app) as base, capture_traces() as traces:
        url = base.replace("http://", "ws://") + "/ws"
        with websockets.sync.client.connect(url, additional_headers={"X-Async-Trace": "1"}) as c:
            c.send("hi")
            assert c.recv(timeout=5) == "HI"
        _wait_for(traces, 1)
    trace = traces[0]
    timers = [r for r in trace.resources if r.type == "timer"]
    assert timers == [], [trace.annotations_of(r.async_id) for r in timers]
    # the messages are still the request's, the close included
    messages = [trace.annotations_of(r.async_id) for r in trace.resources if r.type == "websocket"]
    assert [(m["direction"], m["message"]) for m in messages] == [
        ("receive", "text"),
        ("send", "text"),
        ("send", "close"),
    ]
    assert trace.root.state == "ok"
