"""Request and response bodies as stream-read / stream-write, websocket messages as websocket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from asgi_asynctrace import AsyncTraceMiddleware, Resource, Trace, analyze
from tests.helpers import run


def serve(app: Any, scope: dict[str, Any], incoming: list[tuple[float, dict[str, Any]]],
          send_delay: float = 0.0, raises: type[BaseException] | None = None,
          ) -> tuple[Trace, list[dict[str, Any]]]:  # fmt: skip
    """Run one connection through the middleware: ``incoming`` are (delay, message) pairs."""
    traces: list[Trace] = []
    wrapped = AsyncTraceMiddleware(app, log_traces=False, sinks=[lambda t, d: traces.append(t)])
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if not incoming:
            await asyncio.sleep(3600)  # no more messages: wait like a server would
        delay, message = incoming.pop(0)
        await asyncio.sleep(delay)
        return message

    async def send(message: Any) -> None:
        sent.append(dict(message))
        if message["type"] == "http.response.body":
            await asyncio.sleep(send_delay)  # a slow client: the server's buffer is full

    base = {"asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "http",
            "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80), "headers": [(b"x-async-trace", b"1")]}  # fmt: skip
    if raises is None:
        run(wrapped({**base, **scope}, receive, send))
    else:
        with pytest.raises(raises):  # the app's own exception, passed through untouched
            run(wrapped({**base, **scope}, receive, send))
    assert len(traces) == 1
    return traces[0], sent


def only(trace: Trace, rtype: str) -> Resource:
    (res,) = [r for r in trace.resources if r.type == rtype]
    return res


async def upload(request: Request) -> Response:
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
    return PlainTextResponse(str(size))


def upload_trace() -> tuple[Trace, list[dict[str, Any]]]:
    """150 bytes uploaded in two chunks 20 ms apart: the trace, and what was sent back."""
    app = Starlette(routes=[Route("/upload", upload, methods=["POST"])])
    incoming = [
        (0.0, {"type": "http.request", "body": b"a" * 100, "more_body": True}),
        (0.02, {"type": "http.request", "body": b"b" * 50, "more_body": True}),
        (0.0, {"type": "http.request", "body": b"", "more_body": False}),
    ]
    return serve(app, {"type": "http", "method": "POST", "path": "/upload"}, incoming)


def test_a_request_body_read_from_a_slow_client_is_one_stream_with_a_step_per_chunk() -> None:
    trace, sent = upload_trace()
    assert sent[-1]["type"] == "http.response.body" and sent[-1]["body"] == b"150"
    body = only(trace, "stream-read")
    notes = trace.annotations_of(body.async_id)
    assert (notes["bytes"], notes["chunks"], body.state) == (150, 3, "ok")
    assert body.trigger_id == 1
    labels = analyze(trace).times
    assert labels[body.async_id].label == "request body, 150 bytes"
    assert labels[only(trace, "stream-write").async_id].label == "response body, 3 bytes"
    steps = body.intervals()
    assert len(steps) == 3
    waited = [end - start for start, end in steps if end is not None]
    assert waited[1] >= 19_000_000  # the second chunk: 20 ms blocked on the client
    assert body.settled_at == steps[-1][1]


def test_bodies_that_come_and_go_in_one_message_are_each_one_stream_of_one_step() -> None:
    app = Starlette(routes=[Route("/upload", upload, methods=["POST"])])
    incoming = [(0.0, {"type": "http.request", "body": b"z" * 70, "more_body": False})]
    trace, sent = serve(app, {"type": "http", "method": "POST", "path": "/upload"}, incoming,
                        send_delay=0.01)  # fmt: skip
    assert sent[-1]["body"] == b"70"
    for rtype, size in (("stream-read", 70), ("stream-write", 2)):
        body = only(trace, rtype)
        notes = trace.annotations_of(body.async_id)
        assert (notes, body.state, body.trigger_id) == ({"bytes": size, "chunks": 1}, "ok", 1)
        ((start, end),) = body.intervals()
        assert body.created_at == start and end is not None and body.settled_at == end
    ((start, end),) = only(trace, "stream-write").intervals()
    assert end is not None and end - start >= 9_000_000  # the 10 ms the client took to take it


def test_a_streamed_response_to_a_slow_client_is_one_stream_with_its_blocked_time() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(3):
            yield f"part {i}\n".encode()

    async def download(request: Request) -> Response:
        return StreamingResponse(chunks())

    app = Starlette(routes=[Route("/download", download)])
    request = [(0.0, {"type": "http.request", "body": b""})]
    scope = {"type": "http", "method": "GET", "path": "/download"}
    trace, sent = serve(app, scope, request, send_delay=0.01)
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    out = only(trace, "stream-write")
    notes = trace.annotations_of(out.async_id)
    assert notes["chunks"] == len(bodies) and notes["bytes"] == sum(len(m["body"]) for m in bodies)
    assert out.state == "ok"
    assert all(end is not None and end - start >= 9_000_000 for start, end in out.intervals())


def test_a_body_cut_off_by_a_disconnect_is_a_cancelled_stream() -> None:
    app = Starlette(routes=[Route("/upload", upload, methods=["POST"])])
    incoming: list[tuple[float, dict[str, Any]]] = [
        (0.0, {"type": "http.request", "body": b"x" * 10, "more_body": True}),
        (0.0, {"type": "http.disconnect"}),
    ]
    trace, _ = serve(app, {"type": "http", "method": "POST", "path": "/upload"}, incoming,
                     raises=ClientDisconnect)  # fmt: skip
    body = only(trace, "stream-read")
    notes = trace.annotations_of(body.async_id)
    assert (body.state, notes["bytes"], notes["chunks"]) == ("cancelled", 10, 1)
    assert trace.root.state == "cancelled"


async def _echo(ws: WebSocket) -> None:
    await ws.accept()
    for _ in range(2):
        text = await ws.receive_text()
        await ws.send_text(f"echo: {text}")
    await ws.close()


def chat_trace() -> tuple[Trace, list[dict[str, Any]]]:
    """A websocket echoing two messages, then closing: the trace, and what was sent back."""
    app = Starlette(routes=[WebSocketRoute("/chat", _echo)])
    incoming = [
        (0.0, {"type": "websocket.connect"}),
        (0.01, {"type": "websocket.receive", "text": "hello"}),
        (0.0, {"type": "websocket.receive", "text": "héllo"}),
    ]
    return serve(app, {"type": "websocket", "path": "/chat", "subprotocols": []}, incoming)


def test_each_websocket_message_is_a_resource_and_a_clean_close_is_ok() -> None:
    trace, sent = chat_trace()
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.send",
                                         "websocket.close"]  # fmt: skip
    messages = [trace.annotations_of(r.async_id) for r in trace.resources if r.type == "websocket"]
    assert [(m["direction"], m["message"], m.get("bytes")) for m in messages] == [
        ("receive", "text", 5), ("send", "text", 11),
        ("receive", "text", 6), ("send", "text", 12),
        ("send", "close", None),
    ]  # fmt: skip
    times = analyze(trace).times
    assert [times[r.async_id].label for r in trace.resources if r.type == "websocket"] == [
        "receive text, 5 bytes", "send text, 11 bytes", "receive text, 6 bytes",
        "send text, 12 bytes", "send close",
    ]  # fmt: skip
    first = next(r for r in trace.resources if r.type == "websocket")
    assert first.settled_at is not None and first.settled_at - first.created_at >= 9_000_000
    assert trace.root.state == "ok" and trace.request["method"] == "WS"


async def _listen(ws: WebSocket) -> None:
    """A chat room member: says back what it hears until the client leaves."""
    await ws.accept()
    try:
        while True:
            await ws.send_text(await ws.receive_text())
    except WebSocketDisconnect:
        pass


def test_the_wait_for_the_client_to_close_is_the_connections_last_resource() -> None:
    # The client says one thing, then stays 30 ms before it closes: that wait is the end of
    # the connection's trace, and what held it up at the end.
    app = Starlette(routes=[WebSocketRoute("/room", _listen)])
    incoming: list[tuple[float, dict[str, Any]]] = [
        (0.0, {"type": "websocket.connect"}),
        (0.0, {"type": "websocket.receive", "text": "hi"}),
        (0.03, {"type": "websocket.disconnect", "code": 1001}),
    ]
    trace, sent = serve(app, {"type": "websocket", "path": "/room", "subprotocols": []},
                        incoming)  # fmt: skip
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send"]
    messages = [r for r in trace.resources if r.type == "websocket"]
    notes = [trace.annotations_of(r.async_id) for r in messages]
    assert [(n["direction"], n["message"], n.get("code")) for n in notes] == [
        ("receive", "text", None), ("send", "text", None), ("receive", "close", 1001),
    ]  # fmt: skip
    close = messages[-1]
    assert close.state == "ok" and close.settled_at is not None
    assert close.settled_at - close.created_at >= 25_000_000
    assert trace.annotations_of(trace.root.async_id)["closeCode"] == 1001
    analysis = analyze(trace)
    assert analysis.times[close.async_id].label == "receive close"
    assert analysis.critical_path[-1].async_id == close.async_id
