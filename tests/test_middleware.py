"""The middleware serving requests: traced or not, as the app would serve them; errors,
disconnects, cancellation, streaming, background tasks, other scopes, settings, FastAPI and
websockets; a tracer that cannot start a trace."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from asgi_asynctrace import (
    AsyncTraceMiddleware,
    Trace,
    _request,
    annotate,
    capture_traces,
    decode_trace_header,
    failure_counts,
)
from tests.helpers import call, run
from tests.middleware_app import ON, get_page, routes, traced_app


def test_a_loopback_request_with_the_header_gets_its_trace_in_headers_log_and_store(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = traced_app()
    caplog.set_level(logging.INFO, logger="asgi_asynctrace.trace")

    async def go(c: httpx.AsyncClient) -> tuple[httpx.Response, httpx.Response]:
        r = await c.get("/hello?token=secret-value", headers=ON)
        stored = await c.get(f"/__asynctrace/traces/{r.headers['x-async-trace-id']}")
        return r, stored

    r, stored = call(app, go)
    assert r.status_code == 200 and r.text == "hello" and r.headers["x-app"] == "yes"
    trace_id = r.headers["x-async-trace-id"]
    inline = decode_trace_header(r.headers["x-async-trace-data"])
    assert inline["traceId"] == trace_id and inline["resources"][0]["state"] == "pending"

    lines = [m for m in caplog.messages if m.startswith("AsyncTrace completed; toJson() = ")]
    assert len(lines) == 1
    logged = orjson.loads(lines[0].split(" = ", 1)[1])
    assert logged["traceId"] == trace_id
    assert logged["request"] == {"method": "GET", "path": "/hello", "status": 200}
    root = logged["resources"][0]
    assert root["state"] == "ok" and root["destroyedAt"] == logged["requestDurationNs"]
    assert len(root["callbacks"]) >= 2  # the sleep splits the handler into steps
    assert b"secret-value" not in lines[0].encode()
    assert stored.status_code == 200 and orjson.loads(stored.content) == logged


def test_untraced_requests_are_served_exactly_as_without_the_middleware() -> None:
    bare = Starlette(routes=routes())

    async def go(c: httpx.AsyncClient) -> list[httpx.Response]:
        return [await c.get("/hello"), await c.get("/hello", headers={"X-Async-Trace": "0"})]

    with capture_traces() as traces:
        with_mw = call(traced_app(), go)
        remote = call(traced_app(), lambda c: get_page(c, "/hello", ON), host="203.0.113.9")
    plain = call(bare, go)
    for a, b in zip(with_mw, plain, strict=True):
        assert (a.status_code, a.content, a.headers.raw) == (
            b.status_code,
            b.content,
            b.headers.raw,
        )
    assert "x-async-trace-id" not in remote.headers and remote.text == "hello"
    assert traces == []


def test_an_untraced_request_runs_without_a_frame_of_the_middleware() -> None:
    """Untraced, the middleware hands the app's own coroutine to the server: nothing of ours
    stays in the request's await chain, which every step of the request passes through."""
    seen: list[str] = []

    async def where(request: Request) -> Response:
        seen.extend(f.filename for f in inspect.stack(0))
        return PlainTextResponse("ok")

    app = AsyncTraceMiddleware(Starlette(routes=[Route("/", where)]), log_traces=False)
    assert call(app, lambda c: c.get("/")).text == "ok"
    ours = os.path.join("asgi_asynctrace", "_middleware.py")
    assert seen and not [f for f in seen if f.endswith(ours)]
    assert call(app, lambda c: c.get("/", headers=ON)).text == "ok"  # traced: ours is there
    assert [f for f in seen if f.endswith(ours)]


def test_servers_see_an_asgi3_app() -> None:
    """uvicorn (like other servers) picks ASGI 2 or 3 by asking whether ``__call__`` is a
    coroutine function: the middleware's answers yes, though it returns the app's awaitable."""
    import uvicorn

    app = AsyncTraceMiddleware(Starlette(routes=routes()), log_traces=False)
    assert asyncio.iscoroutinefunction(app.__call__)
    if hasattr(inspect, "markcoroutinefunction"):
        assert inspect.iscoroutinefunction(app.__call__)
    config = uvicorn.Config(app, log_level="warning")
    config.load()
    assert config.interface == "asgi3"


def test_an_exception_propagates_unchanged_and_the_trace_says_error() -> None:
    seen: list[BaseException] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        try:
            raise LookupError("no such thing")
        except LookupError as exc:
            seen.append(exc)
            raise

    wrapped = AsyncTraceMiddleware(app)
    scope = {"type": "http", "method": "GET", "path": "/", "headers": [(b"x-async-trace", b"1")],
             "client": ("127.0.0.1", 1)}  # fmt: skip

    async def main() -> BaseException:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b""}

        async def send(message: Any) -> None:
            pass

        with pytest.raises(LookupError) as caught:
            await wrapped(scope, receive, send)
        return caught.value

    with capture_traces() as traces:
        raised = run(main())
    assert raised is seen[0] and raised.__cause__ is None and raised.__context__ is None
    root = traces[0].root
    assert root.state == "error" and traces[0].annotations_of(1)["error"] == "LookupError"


def test_a_client_that_disconnects_mid_request_leaves_a_cancelled_trace() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        assert message["type"] == "http.disconnect"

    wrapped = AsyncTraceMiddleware(app)
    scope = {"type": "http", "method": "POST", "path": "/up", "headers": [(b"x-async-trace", b"1")],
             "client": ("::1", 1)}  # fmt: skip

    async def main() -> None:
        async def receive() -> dict[str, Any]:
            await asyncio.sleep(0.001)
            return {"type": "http.disconnect"}

        async def send(message: Any) -> None:
            raise AssertionError("nothing is sent")

        await wrapped(scope, receive, send)

    with capture_traces() as traces:
        run(main())
    assert traces[0].root.state == "cancelled"
    assert "disconnectedAt" in traces[0].annotations_of(1)


def test_a_cancelled_request_is_finalized_as_cancelled_and_still_emitted() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(10)

    wrapped = AsyncTraceMiddleware(app)
    scope = {"type": "http", "method": "GET", "path": "/", "headers": [(b"x-async-trace", b"1")],
             "client": ("127.0.0.1", 1)}  # fmt: skip

    async def main() -> None:
        task = asyncio.ensure_future(wrapped(scope, None, None))  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with capture_traces() as traces:
        run(main())
    assert traces[0].root.state == "cancelled" and traces[0].closed


def test_a_streaming_response_is_passed_on_chunk_by_chunk_and_traced() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(3):
            await asyncio.sleep(0.002)
            yield f"c{i}".encode()

    async def endpoint(request: Request) -> Response:
        return StreamingResponse(chunks())

    app = Starlette(routes=[Route("/s", endpoint)])
    app.add_middleware(AsyncTraceMiddleware)
    sent: list[dict[str, Any]] = []

    async def main() -> None:
        scope = {
            "type": "http",
            "method": "GET",
            "path": "/s",
            "client": ("127.0.0.1", 1),
            "headers": [(b"x-async-trace", b"1")],
            "query_string": b"",
            "root_path": "",
        }
        waiting = asyncio.Event()

        async def receive() -> dict[str, Any]:
            await waiting.wait()
            return {"type": "http.disconnect"}

        async def send(message: Any) -> None:
            sent.append(dict(message))

        await app(scope, receive, send)

    with capture_traces() as traces:
        run(main())
    bodies = [m.get("body") for m in sent if m["type"] == "http.response.body"]
    assert bodies[:3] == [b"c0", b"c1", b"c2"]
    assert traces[0].root.state == "ok" and len(traces[0].root.callbacks) >= 6


def test_the_log_line_waits_for_background_tasks() -> None:
    with capture_traces() as traces:
        call(traced_app(), lambda c: get_page(c, "/background", ON))
    assert traces[0].annotations_of(1)["background"] == "done"


def test_lifespan_and_other_scopes_pass_through_untouched() -> None:
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope, receive, send))

    wrapped = AsyncTraceMiddleware(app)
    scope = {"type": "lifespan"}
    run(wrapped(scope, print, print))  # type: ignore[arg-type]
    assert seen == [(scope, print, print)]


def test_a_minimal_scope_without_headers_or_client_is_served() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204})
        await send({"type": "http.response.body"})

    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    run(AsyncTraceMiddleware(app, sample_rate=1.0)({"type": "http"}, print, send))  # type: ignore[arg-type]
    assert sent == [{"type": "http.response.start", "status": 204}, {"type": "http.response.body"}]


def test_bad_settings_are_refused_with_a_clear_error() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    with pytest.raises(ValueError, match="sample_rate"):
        AsyncTraceMiddleware(app, sample_rate=2)
    with pytest.raises(ValueError, match="secret"):
        AsyncTraceMiddleware(app, secret="")
    with pytest.raises(ValueError, match="path_prefix"):
        AsyncTraceMiddleware(app, path_prefix="traces/")


def test_fastapi_apps_take_the_same_middleware() -> None:
    from fastapi import FastAPI

    api = FastAPI()

    @api.get("/items/{item_id}")
    def read_item(item_id: int) -> dict[str, int]:
        annotate("item", item_id)
        return {"item_id": item_id}

    api.add_middleware(AsyncTraceMiddleware)
    with capture_traces() as traces:
        r = call(api, lambda c: get_page(c, "/items/7", ON))
    assert r.json() == {"item_id": 7}
    thread = next(res for res in traces[0].resources if res.type == "thread")
    assert traces[0].annotations_of(thread.async_id)["item"] == 7


def test_a_websocket_connection_is_traced_when_its_handshake_asks() -> None:
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocket

    async def echo(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_text(await ws.receive_text())
        await ws.close()

    app = Starlette(routes=[WebSocketRoute("/ws", echo)])
    app.add_middleware(AsyncTraceMiddleware, secret="k")
    incoming = [
        {"type": "websocket.connect"},
        {"type": "websocket.receive", "text": "hi"},
        {"type": "websocket.disconnect", "code": 1000},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> Any:
        await asyncio.sleep(0)
        return incoming.pop(0)

    async def send(message: Any) -> None:
        sent.append(dict(message))

    scope = {"type": "websocket", "path": "/ws", "headers": [(b"x-async-trace", b"k")],
             "client": ("198.51.100.7", 1), "query_string": b"", "root_path": "",
             "subprotocols": []}  # fmt: skip
    with capture_traces() as traces:
        run(app(scope, receive, send))
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert sent[1]["text"] == "hi"
    accept_headers = dict(sent[0]["headers"])
    assert accept_headers[b"x-async-trace-id"] == traces[0].trace_id.encode()
    assert len(traces) == 1 and traces[0].request["method"] == "WS"
    assert traces[0].root.state == "ok"


def test_a_tracer_that_cannot_start_a_trace_serves_the_request_untraced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Trace:
        raise MemoryError("no room")

    monkeypatch.setattr(Trace, "start", broken)  # the Python's way to a trace, and the C's
    if _request._open_request is not None:
        monkeypatch.setattr(_request, "_open_request", broken)
    r = call(traced_app(), lambda c: get_page(c, "/hello", ON))
    assert r.status_code == 200 and r.text == "hello" and "x-async-trace-id" not in r.headers
    assert failure_counts() == {"start-trace": 1}


_FIRST_REQUEST = """
import asyncio, sys
import anyio
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from asgi_asynctrace import AsyncTraceMiddleware

async def ok(request):
    return PlainTextResponse("ok")

loaded_before = "anyio._backends._asyncio" in sys.modules
app = AsyncTraceMiddleware(Starlette(routes=[Route("/", ok)]), log_traces=False)
loaded_at_startup = "anyio._backends._asyncio" in sys.modules

async def first_traced_request():
    async def receive():
        return {"type": "http.request", "body": b""}
    async def send(message):
        pass
    before = set(sys.modules)
    scope = {"type": "http", "method": "GET", "path": "/", "headers": [(b"x-async-trace", b"1")],
             "client": ("127.0.0.1", 1), "query_string": b"", "root_path": ""}
    await app(scope, receive, send)
    return sorted(set(sys.modules) - before), len(app.store)

imported, stored = asyncio.run(first_traced_request())
print(loaded_before, loaded_at_startup, imported, stored)
"""


def test_the_first_traced_request_does_not_wait_for_anyios_backend_to_load() -> None:
    # Loading anyio's asyncio backend takes about 10 ms; done by the first traced request
    # (to patch its thread-pool calls) it showed as a gap before that request's first step.
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _FIRST_REQUEST], capture_output=True,
                         text=True, check=True, timeout=60)  # fmt: skip
    assert out.stdout.split() == ["False", "True", "[]", "1"], out.stdout + out.stderr
