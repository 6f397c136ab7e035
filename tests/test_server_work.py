"""What a real server does inside the app's ``send`` is the server's work, not the request's."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from asgi_asynctrace import AsyncTraceMiddleware, Trace, analyze, capture_traces, load_trace
from tests.servers import app_process, serving


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


async def refuse(websocket: WebSocket) -> None:
    await websocket.send_denial_response(PlainTextResponse("not you", status_code=403))


def test_a_websocket_refused_with_an_http_response_records_its_status_and_body() -> None:
    """The ASGI websocket.http.response extension (uvicorn offers it): the app answers the
    handshake with an HTTP response; that response is the request's, with its status, its
    body and, when asked for, the trace's headers."""
    import websockets.exceptions
    import websockets.sync.client

    app = AsyncTraceMiddleware(Starlette(routes=[WebSocketRoute("/ws", refuse)]),
                               log_traces=False)  # fmt: skip
    with serving(app) as base, capture_traces() as traces:
        url = base.replace("http://", "ws://") + "/ws"
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            websockets.sync.client.connect(url, additional_headers={"X-Async-Trace": "1"})
        _wait_for(traces, 1)
    response = refused.value.response
    assert response.status_code == 403 and response.body == b"not you"
    trace = traces[0]
    assert response.headers["x-async-trace-id"] == trace.trace_id
    assert trace.request["status"] == 403
    notes = trace.annotations_of(trace.root.async_id)
    assert notes["status"] == 403 and "responseStartedAt" in notes
    (write,) = [r for r in trace.resources if r.type == "stream-write"]
    assert trace.annotations_of(write.async_id)["bytes"] == 7 and write.state == "ok"
    assert [r for r in trace.resources if r.type == "timer"] == []


def test_a_file_the_server_sends_itself_is_the_response_body_and_its_work_is_its_own(
    tmp_path: Path,
) -> None:
    """granian sends a ``FileResponse``'s file itself, when the app hands it the file's path
    (the ASGI ``http.response.pathsend`` extension): that is the response's body, a
    ``stream-write`` with the file's path and size, sent outside the trace like a last chunk."""
    content = tmp_path / "report.csv"
    content.write_bytes(b"id,total\n" * 500)
    command = ["granian", "--interface", "asgi", "tests.files_app:app", "--workers", "1"]
    with app_process(command, {"FILES_APP_FILE": str(content)}) as (base, _):
        got = httpx.get(base + "/file", headers={"X-Async-Trace": "1"})
        assert got.status_code == 200 and got.content == content.read_bytes()
        assert got.headers["x-pathsend"] == "1"  # the server offered it, and Starlette used it
        trace_id = got.headers["x-async-trace-id"]
        for _ in range(50):  # stored once the request has ended, just after the answer
            stored = httpx.get(f"{base}/__asynctrace/traces/{trace_id}")
            if stored.status_code == 200:
                break
            time.sleep(0.05)
    trace = load_trace(stored.content)
    (write,) = [r for r in trace.resources if r.type == "stream-write"]
    notes = trace.annotations_of(write.async_id)
    assert notes == {"path": str(content), "bytes": 4500, "chunks": 1}
    assert write.state == "ok" and write.trigger_id == trace.root.async_id
    assert trace.root.state == "ok" and trace.request["status"] == 200
    assert [r.type for r in trace.resources if r.type == "timer"] == []
    assert analyze(trace).times[write.async_id].label == "response body, 4500 bytes"
