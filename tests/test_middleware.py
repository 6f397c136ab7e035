from __future__ import annotations

import asyncio
import inspect
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from asgi_asynctrace import (
    AnalysisSettings,
    AsyncTraceMiddleware,
    Trace,
    _request,
    annotate,
    capture_traces,
    decode_trace_header,
    failure_counts,
    load_trace,
)
from tests.helpers import call, run

ON = {"X-Async-Trace": "1"}


async def hello(request: Request) -> Response:
    await asyncio.sleep(0.001)
    return PlainTextResponse("hello", headers={"x-app": "yes"})


async def boom(request: Request) -> Response:
    raise LookupError("no such thing")


async def big(request: Request) -> Response:
    for i in range(300):
        annotate(f"k{i}", "x" * 100)
    return PlainTextResponse("big")


async def with_background(request: Request) -> Response:
    async def later() -> None:
        await asyncio.sleep(0.01)
        annotate("background", "done")

    return PlainTextResponse("ok", background=BackgroundTask(later))


def routes() -> list[Route]:
    return [
        Route("/hello", hello),
        Route("/boom", boom),
        Route("/big", big),
        Route("/background", with_background),
    ]


def traced_app(**settings: Any) -> Starlette:
    app = Starlette(routes=routes())
    app.add_middleware(AsyncTraceMiddleware, **settings)
    return app


async def _get(c: httpx.AsyncClient, path: str, headers: dict[str, str] | None = None) -> Any:
    return await c.get(path, headers=headers or {})


def test_the_store_serves_each_trace_with_its_analysis_under_the_apps_thresholds() -> None:
    async def blocking(request: Request) -> Response:
        time.sleep(0.03)  # longer than the default blocked-step threshold of 20 ms
        return PlainTextResponse("done")

    def served_kinds(settings: AnalysisSettings | None) -> list[str]:
        app = AsyncTraceMiddleware(
            Starlette(routes=[Route("/block", blocking)]), log_traces=False, analysis=settings
        )

        async def go(c: httpx.AsyncClient) -> httpx.Response:
            r = await c.get("/block", headers=ON)
            path = f"/__asynctrace/traces/{r.headers['x-async-trace-id']}?analysis=1"
            return await c.get(path)

        body = call(app, go).json()
        assert body["trace"]["request"]["path"] == "/block"
        return [f["kind"] for f in body["analysis"]["findings"]]

    assert "blocked-loop" in served_kinds(None)
    assert "blocked-loop" not in served_kinds(AnalysisSettings(blocked_step_ms=5_000))


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
        remote = call(traced_app(), lambda c: _get(c, "/hello", ON), host="203.0.113.9")
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


@pytest.mark.parametrize(
    "value",
    ["", "0", "off", "x" * 5000, "caf\u00e9", "\x00\x01", "1, 1", " true "],
)
def test_odd_header_values_never_cause_an_error(value: str) -> None:
    app = traced_app()
    headers = [(b"x-async-trace", value.encode("utf-8"))]

    async def go(c: httpx.AsyncClient) -> httpx.Response:
        return await c.get("/hello", headers=headers)

    r = call(app, go)
    assert r.status_code == 200 and r.text == "hello"
    traced = "x-async-trace-id" in r.headers
    assert traced == (value in ("1, 1", " true "))


def test_with_a_secret_only_the_secret_turns_tracing_on_from_any_client() -> None:
    app = traced_app(secret="s3cret")

    async def go(c: httpx.AsyncClient) -> list[httpx.Response]:
        return [
            await c.get("/hello", headers={"X-Async-Trace": "s3cret"}),
            await c.get("/hello", headers={"X-Async-Trace": "1"}),
            await c.get("/hello", headers={"X-Async-Trace": "s3cre"}),
            await c.get("/__asynctrace/traces"),
            await c.get("/__asynctrace/traces", headers={"X-Async-Trace": "s3cret"}),
        ]

    ok, plain, near, store_closed, store_open = call(app, go, host="198.51.100.7")
    assert "x-async-trace-id" in ok.headers
    assert "x-async-trace-id" not in plain.headers and "x-async-trace-id" not in near.headers
    assert store_closed.status_code == 404  # passed through to the app, which has no such route
    assert [t["traceId"] for t in store_open.json()["traces"]] == [ok.headers["x-async-trace-id"]]


def test_sampled_requests_are_traced_without_any_response_header() -> None:
    app = traced_app(sample_rate=1.0)
    with capture_traces() as traces:
        r = call(app, lambda c: _get(c, "/hello"), host="203.0.113.9")
    assert (
        r.headers.raw == call(Starlette(routes=routes()), lambda c: _get(c, "/hello")).headers.raw
    )
    assert len(traces) == 1 and traces[0].annotations_of(1)["traced"] == "sampled"


@pytest.fixture(params=["C scan", "Python scan"])
def either_scan(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The untraced path's header scan in C, then in Python (as where there is no compiler)."""
    from asgi_asynctrace import _middleware

    if request.param == "Python scan":
        monkeypatch.setattr(_middleware, "_check", None)
    elif _middleware._check is None:
        pytest.skip("built without the C accelerator")


@pytest.mark.usefixtures("either_scan")
def test_sample_rate_traces_that_fraction_of_requests() -> None:
    traces: list[Trace] = []
    app = traced_app(sample_rate=0.25, sinks=[lambda t, d: traces.append(t)])

    async def go(c: httpx.AsyncClient) -> None:
        for _ in range(800):
            await c.get("/hello")

    call(app, go, host="203.0.113.9")
    # 200 expected; a binomial(800, 0.25) falls outside 140..260 about once in 10**7 runs
    assert 140 <= len(traces) <= 260
    assert {t.annotations_of(1)["traced"] for t in traces} == {"sampled"}


@pytest.mark.usefixtures("either_scan")
def test_max_sampled_per_s_caps_sampled_traces_not_requested_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from asgi_asynctrace import _middleware

    now = [1000.0]
    monkeypatch.setattr(_middleware, "_clock", lambda: now[0])  # the budget's clock only
    traces: list[Trace] = []
    app = traced_app(sample_rate=1.0, max_sampled_per_s=4, sinks=[lambda t, d: traces.append(t)])

    async def burst(c: httpx.AsyncClient) -> None:
        for _ in range(30):
            assert (await c.get("/hello")).status_code == 200  # every request answered

    def traced(kind: str) -> int:
        return sum(t.annotations_of(1)["traced"] == kind for t in traces)

    call(app, burst, host="203.0.113.9")
    assert traced("sampled") == 4  # a second's worth at once, then none
    now[0] += 0.5
    call(app, burst, host="203.0.113.9")
    assert traced("sampled") == 6  # half a second later: two more
    # a request that asks is traced whatever the budget, and takes nothing from it
    call(app, lambda c: _get(c, "/hello", ON))
    assert traced("requested") == 1
    now[0] += 0.25
    call(app, burst, host="203.0.113.9")
    assert traced("sampled") == 7
    with pytest.raises(ValueError, match="max_sampled_per_s must be > 0"):
        AsyncTraceMiddleware(app, max_sampled_per_s=0)


def test_a_trace_too_big_for_the_header_says_where_to_fetch_it() -> None:
    app = traced_app(header_limit=200)
    r = call(app, lambda c: _get(c, "/big", ON))
    marker = r.headers["x-async-trace-data"]
    assert marker.startswith("omitted: ") and "> limit 200" in marker
    assert marker.endswith(f"GET /__asynctrace/traces/{r.headers['x-async-trace-id']}")
    with pytest.raises(ValueError, match="fetch it by its id"):
        decode_trace_header(marker)


def test_header_limit_0_turns_inline_traces_off_without_serializing_for_the_header(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from asgi_asynctrace import _request

    def refused(trace: Trace) -> str:
        raise AssertionError("serialized for a header that is off")

    monkeypatch.setattr(_request, "trace_header", refused)
    monkeypatch.setattr(Trace, "to_json", refused)
    with capture_traces() as traces:
        r = call(traced_app(header_limit=0, log_traces=False), lambda c: _get(c, "/hello", ON))
    trace_id = r.headers["x-async-trace-id"]
    assert r.status_code == 200 and r.text == "hello" and traces[0].trace_id == trace_id
    assert (
        r.headers["x-async-trace-data"]
        == f"omitted: header_limit=0; GET /__asynctrace/traces/{trace_id}"
    )
    assert failure_counts() == {}


def test_the_store_lists_newest_first_and_forgets_the_oldest() -> None:
    app = traced_app(store_size=2)

    async def go(c: httpx.AsyncClient) -> tuple[list[str], httpx.Response, httpx.Response]:
        ids = [(await c.get("/hello", headers=ON)).headers["x-async-trace-id"] for _ in range(3)]
        listing = await c.get("/__asynctrace/traces")
        gone = await c.get(f"/__asynctrace/traces/{ids[0]}")
        return ids, listing, gone

    ids, listing, gone = call(app, go)
    assert [t["traceId"] for t in listing.json()["traces"]] == [ids[2], ids[1]]
    assert listing.json()["traces"][0]["path"] == "/hello"
    assert gone.status_code == 404 and "keeps the last 2" in gone.json()["error"]
    # and names the likeliest other reason: the trace is in another worker process's store
    assert f"of this process ({os.getpid()}); under several worker" in gone.json()["error"]
    assert "store_dir" in gone.json()["error"]


def test_the_store_is_closed_to_remote_clients_without_a_secret() -> None:
    r = call(traced_app(), lambda c: _get(c, "/__asynctrace/traces"), host="203.0.113.9")
    assert r.status_code == 404 and r.text == "Not Found"  # the app's own 404


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
        call(traced_app(), lambda c: _get(c, "/background", ON))
    assert traces[0].annotations_of(1)["background"] == "done"


def test_a_failing_sink_is_counted_once_logged_and_never_reaches_the_app(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(trace: Trace, data: bytes) -> None:
        raise RuntimeError("disk full")

    got: list[bytes] = []
    app = traced_app(sinks=[broken, lambda trace, data: got.append(data)])

    async def go(c: httpx.AsyncClient) -> list[httpx.Response]:
        return [await c.get("/hello", headers=ON) for _ in range(3)]

    responses = call(app, go)
    assert all(r.status_code == 200 and r.text == "hello" for r in responses)
    assert list(failure_counts().values()) == [3]
    assert next(iter(failure_counts())).endswith("<locals>.broken")
    warnings = [
        r for r in caplog.records if r.name == "asgi_asynctrace" and "disk full" in r.getMessage()
    ]
    assert len(warnings) == 1
    assert len(got) == 3 and load_trace(got[0]).root.state == "ok"


def test_the_json_is_made_only_for_a_sink_that_reads_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[str] = []
    to_json = Trace.to_json

    def counted(self: Trace) -> bytes:
        made.append(self.trace_id)
        return to_json(self)

    monkeypatch.setattr(Trace, "to_json", counted)
    seen: list[bytes | None] = []

    class TraceOnly:
        needs_json = False

        def __call__(self, trace: Trace, data: bytes | None) -> None:
            seen.append(data)

    log = logging.getLogger("asgi_asynctrace.trace")

    async def one(c: httpx.AsyncClient) -> str:
        r = await c.get("/hello", headers=ON)
        return str(r.headers["x-async-trace-id"])

    # the log line off (its logger above INFO), the store and a sink that reads the Trace
    app = AsyncTraceMiddleware(Starlette(routes=routes()), sinks=[TraceOnly()])
    level = log.level
    log.setLevel(logging.WARNING)  # setLevel, which empties the logger's cache of levels
    try:
        trace_id = call(app, one)
    finally:
        log.setLevel(level)
    assert made == [] and seen == [None]  # finished, stored, and no JSON made for it
    store = app.store
    assert store is not None
    first = store.get(trace_id)  # the JSON is written when the trace is first read ...
    assert first is not None and made == [trace_id]
    assert load_trace(first).trace_id == trace_id
    assert store.get(trace_id) is first and made == [trace_id]  # ... and then kept
    # the log line on: one JSON, given to the log and the store; the other sink gets it too
    made.clear()
    seen.clear()
    assert log.isEnabledFor(logging.INFO)
    trace_id = call(app, one)
    assert made == [trace_id] and seen[0] is not None
    assert store.get(trace_id) is seen[0] and made == [trace_id]
    # a sink that says nothing of needs_json gets the bytes, the log line off or not
    got: list[bytes] = []
    other = traced_app(log_traces=False, sinks=[lambda trace, data: got.append(data)])
    made.clear()
    trace_id = call(other, one)
    assert made == [trace_id] and load_trace(got[0]).trace_id == trace_id


def test_a_sink_whose_needs_json_fails_is_skipped_and_counted() -> None:
    class Odd:
        @property
        def needs_json(self) -> bool:
            raise RuntimeError("confused")

        def __call__(self, trace: Trace, data: bytes | None) -> None:
            raise AssertionError("never called")

    got: list[bytes] = []
    app = traced_app(sinks=[Odd(), lambda trace, data: got.append(data)])
    r = call(app, lambda c: _get(c, "/hello", ON))
    assert r.status_code == 200 and r.text == "hello" and len(got) == 1
    assert list(failure_counts().values()) == [1]


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
        r = call(api, lambda c: _get(c, "/items/7", ON))
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
    r = call(traced_app(), lambda c: _get(c, "/hello", ON))
    assert r.status_code == 200 and r.text == "hello" and "x-async-trace-id" not in r.headers
    assert failure_counts() == {"start-trace": 1}


_PARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.mark.skipif(_request._open_request is None, reason="the C accelerator is not built")
@pytest.mark.parametrize(
    ("scope", "traced"),
    [
        ({"type": "http", "method": "GET", "path": "/a", "client": ("10.0.0.7", 5),
          "headers": [(b"traceparent", _PARENT)]}, "sampled"),
        ({"type": "http", "method": "POST", "path": "/b", "client": None,
          "headers": ((b"traceparent", _PARENT.upper()),)}, "requested"),
        ({"type": "websocket", "path": "/ws", "client": ["::1", 9], "headers": []}, "requested"),
        ({"type": "http", "method": "", "headers": [[b"traceparent", _PARENT + b"0"]]}, "sampled"),
        ({"type": "http", "method": "GET", "path": "/c"}, "sampled"),
    ],
)  # fmt: skip
def test_a_trace_opened_in_c_is_the_one_the_python_opens(scope: Any, traced: str) -> None:
    owner = AsyncTraceMiddleware(PlainTextResponse("x"), record_futures=False,
                                 propagate_to={"svc": "s"}, instrument=False)  # fmt: skip
    websocket = scope["type"] == "websocket"
    open_request = _request._open_request
    assert open_request is not None
    made = open_request(scope, websocket, traced, owner._trace_settings)
    python = _request._open_in_python(owner, scope, websocket, traced)
    assert isinstance(made, Trace) and made.trace_id != python.trace_id
    assert made.request == python.request
    assert made.annotations == python.annotations and len(made.resources) == 1
    assert made.root.type == "root" and made.root.created_at == made.origin
    assert made.record_futures is False and made.propagate_to is owner.propagate_to
    assert made.limits is owner.limits and not made.closed and made.ended_at is None
    assert abs(made.started_at_unix_ns - python.started_at_unix_ns) < 10**9
    assert ("traceparent" in made.request) == (scope.get("headers") == [(b"traceparent", _PARENT)])


def test_a_trace_opened_in_c_hands_unusual_headers_to_the_python() -> None:
    open_request = _request._open_request
    if open_request is None:
        pytest.skip("the C accelerator is not built")
    owner = AsyncTraceMiddleware(PlainTextResponse("x"), instrument=False)
    for headers in (iter([(b"traceparent", _PARENT)]), [(b"traceparent", "text")]):
        scope = {"type": "http", "method": "GET", "path": "/", "headers": headers}
        made = open_request(scope, False, "sampled", owner._trace_settings)
        assert made is NotImplemented


@pytest.mark.parametrize(
    "headers",
    [
        [(b"accept", b"*/*"), (b"x-async-trace", b"1")],  # what servers send: the C scan
        ((b"x-async-trace", b"1"),),
        [[b"x-async-trace", b"1"]],
        iter([(b"accept", b"*/*"), (b"x-async-trace", b"1")]),  # unusual: the Python scan
        [(bytearray(b"accept"), b"*/*"), (b"x-async-trace", b"1")],
    ],
)
def test_the_header_is_found_in_any_shape_of_header_list(headers: Any) -> None:
    traces: list[Trace] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204})
        await send({"type": "http.response.body"})

    async def send(message: Any) -> None:
        pass

    wrapped = AsyncTraceMiddleware(app, log_traces=False, sinks=[lambda t, d: traces.append(t)])
    scope = {"type": "http", "path": "/", "headers": headers, "client": ("127.0.0.1", 1)}
    run(wrapped(scope, print, send))  # type: ignore[arg-type]
    assert len(traces) == 1
    assert failure_counts() == {}


def test_the_c_check_and_the_python_check_agree() -> None:
    from asgi_asynctrace import _middleware

    check = _middleware._check
    if check is None:
        pytest.skip("built without the C accelerator: only the Python check exists")
    mw = AsyncTraceMiddleware(lambda s, r, se: None, log_traces=False)  # type: ignore[arg-type,return-value]
    scopes: list[dict[str, Any]] = [
        {"type": "http", "path": "/x", "headers": [(b"a", b"1")]},
        {"type": "http", "path": "/x", "headers": [(b"x-async-trace", b"yes")]},
        {"type": "websocket", "path": "/__asynctrace/traces", "headers": []},
        {"type": "http", "path": "/__asynctracé", "headers": []},
        {"type": "http", "path": "/é/x", "headers": []},
        {"type": "lifespan"},
        {"type": "http"},
    ]
    for scope in scopes:
        value = check(scope, b"x-async-trace", "/__asynctrace")
        python_value, python_slow = mw._check_in_python(scope)
        if value is True:
            assert python_slow and python_value is None
        elif value is None:
            assert not python_slow
        else:
            assert python_slow and python_value == value


@pytest.mark.parametrize("shape", [tuple, list])
def test_a_traceparent_is_kept_however_the_server_shapes_its_headers(shape: Any) -> None:
    # Servers give (name, value) tuples; a list of lists is valid ASGI too, and is read by the
    # Python scan where the C one declines it.
    parent = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    headers = [shape(p) for p in [(b"host", b"x"), (b"x-async-trace", b"1"),
                                  (b"traceparent", parent)]]  # fmt: skip
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": "/hello", "raw_path": b"/hello", "query_string": b"",
             "root_path": "", "headers": headers, "client": ("127.0.0.1", 5000),
             "server": ("127.0.0.1", 8000)}  # fmt: skip
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        sent.append(message)

    with capture_traces() as traces:
        run(traced_app(log_traces=False)(scope, receive, send))
    assert sent[-1]["body"] == b"hello"
    (trace,) = traces
    assert trace.request["traceparent"] == parent.decode()
    assert trace.annotations_of(trace.root.async_id)["traced"] == "requested"


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
