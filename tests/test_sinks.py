"""Where a trace goes: the response header (its codec: what it writes is the trace, whatever
was cached before; its limit), the store, and sinks that fail."""

from __future__ import annotations

import base64
import logging
import os
import random
import threading
import time
import zlib
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_asynctrace import (
    AnalysisSettings,
    AsyncTraceMiddleware,
    Trace,
    capture_traces,
    decode_trace_header,
    failure_counts,
    load_trace,
)
from asgi_asynctrace._context import ACTIVE, ResourceScope
from asgi_asynctrace._sinks import _tables, encode_trace_header, trace_header

from .helpers import call
from .middleware_app import ON, get_page, routes, traced_app
from .test_model import _python_core_trace


def _raw(value: str) -> bytes:
    packed = value.removeprefix("z1:")
    return zlib.decompress(base64.urlsafe_b64decode(packed + "=" * (-len(packed) % 4)))


def _get(n: int) -> None:  # a cache call site of its own
    with ResourceScope("cache-get", key=f"k{n}"):
        pass


def _put(n: int) -> None:
    with ResourceScope("cache-put", key=f"k{n}"):
        pass


def _traced(cls: type[Trace], calls: list[Any], label: str) -> Trace:
    trace = cls.start(request={"method": "GET", "path": label})
    token = ACTIVE.set((trace, trace.root))
    try:
        for i, call in enumerate(calls):
            call(i)
    finally:
        ACTIVE.reset(token)
    trace.annotate(trace.root, "label", label)
    trace.finish(time.perf_counter_ns(), "ok")
    return trace


@pytest.mark.parametrize("core", ["c", "python"])
def test_the_header_holds_the_trace_as_to_json_writes_it_cached_table_or_not(core: str) -> None:
    cls = Trace if core == "c" else _python_core_trace()
    _tables.clear()
    # one call site, so the same stacks: the second trace's table comes from the cache; the
    # third has the same stacks in another order, so a table of its own
    first, again, other = [
        _traced(cls, calls, label)
        for calls, label in [
            ([_get, _put, _get], "/first"),
            ([_get, _put, _get], "/again"),
            ([_put, _get], "/other"),
        ]
    ]
    for trace in (first, again, other):
        assert len(trace.stacks) >= 2
        decoded = decode_trace_header(trace_header(trace))
        assert decoded == orjson.loads(trace.to_json())
        assert list(decoded) == list(trace.to_dict())  # shown in the model's order
    assert len(_tables) == 2
    # the stream is one zlib stream: its checksum and end are checked by zlib itself
    assert orjson.loads(_raw(trace_header(again)))["request"]["path"] == "/again"


def test_the_cached_head_is_padded_to_whole_base64_groups_with_empty_stored_blocks() -> None:
    # The head (zlib header and the compressed stack table) is cached as base64 text, which
    # joins with the rest's only when the head is a multiple of 3 bytes: empty stored blocks
    # pad it. Every remainder must give a header that zlib itself reads back whole.
    from asgi_asynctrace._sinks import _ZLIB_HEAD, _deflate

    _tables.clear()
    seen = set()
    for n in range(1, 40):
        trace = Trace.start(request={"method": "GET", "path": f"/{n}"})
        for i in range(n):
            sid = trace.stack_id(f"site{i}", (f"f{i} @ app.py:{i * 7}:{n}",))
            trace.add("cache-get", 1, sid, trace.origin + i)
        trace.finish(trace.origin + 10**6)
        head = _ZLIB_HEAD + _deflate(b'{"stackTraces":' + trace.stack_table_json() + b",")
        seen.add(len(head) % 3)
        value = trace_header(trace)
        assert orjson.loads(_raw(value)) == orjson.loads(trace.to_json())
        assert decode_trace_header(value) == orjson.loads(trace.to_json())
        assert value == trace_header(trace)  # the second time from the cached head
    assert seen == {0, 1, 2}


def test_a_stack_frame_json_cannot_hold_is_written_as_to_json_writes_it() -> None:
    before = failure_counts().get("serialize", 0)
    trace = Trace.start()
    trace.stacks.append(("bad \udcff frame @ x.py:1:1",))
    trace.finish(time.perf_counter_ns(), "ok")
    assert decode_trace_header(trace_header(trace)) == orjson.loads(trace.to_json())
    assert failure_counts().get("serialize", 0) > before


def test_reused_compressors_never_let_one_header_depend_on_another() -> None:
    rng = random.Random(7)
    words = [b'"asyncId":', b'"type":"cache-get"', b"null,", b'{"key":', b"12345", b"]}"]
    for size in [0, 1, 100, 5_000, 40_000, 70_000, *[rng.randrange(20_000) for _ in range(60)]]:
        data = b"".join(rng.choice(words) for _ in range(size // 8)) + rng.randbytes(size % 8)
        assert _raw(encode_trace_header(data)) == data


def test_headers_made_on_several_threads_at_once_are_each_their_own() -> None:
    wrong: list[bytes] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(150):
            data = orjson.dumps({"seed": seed, "values": [rng.random() for _ in range(300)]})
            if _raw(encode_trace_header(data)) != data:
                wrong.append(data)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def _finished(path: str, status: int) -> Trace:
    trace = Trace.start(request={"method": "GET", "path": path})
    trace.request["status"] = status
    trace.add("timer", 1, None, trace.origin + 5)
    trace.finish(trace.origin + 1_000, "error" if status >= 500 else "ok")
    return trace


def test_the_store_summarises_a_trace_the_same_before_and_after_it_is_read() -> None:
    from asgi_asynctrace._sinks import TraceStore

    store = TraceStore(max_traces=3)
    kept, given = _finished("/a", 200), _finished("/b", 503)
    store(kept)  # kept as the Trace: summarised when listed
    store(given, given.to_json())  # the JSON given with it: summarised at once
    before = store.summaries()
    assert [s["path"] for s in before] == ["/b", "/a"]  # newest first
    assert before[1] == {
        "traceId": kept.trace_id, "method": "GET", "path": "/a", "status": 200, "state": "ok",
        "startedAtUnixNs": kept.started_at_unix_ns, "durationNs": 1_000, "resources": 2,
    }  # fmt: skip
    assert before[0]["state"] == "error" and before[0]["resources"] == 2
    assert store.get(kept.trace_id) == kept.to_json() == store.get(kept.trace_id)
    assert store.summaries() == before  # read: its JSON kept, its place and summary unchanged
    for path in ("/c", "/d"):
        store(_finished(path, 200))
    assert [s["path"] for s in store.summaries()] == ["/d", "/c", "/b"]
    assert store.get(kept.trace_id) is None and len(store) == 3


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


def test_a_trace_too_big_for_the_header_says_where_to_fetch_it() -> None:
    app = traced_app(header_limit=200)
    r = call(app, lambda c: get_page(c, "/big", ON))
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
        r = call(traced_app(header_limit=0, log_traces=False), lambda c: get_page(c, "/hello", ON))
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
    r = call(traced_app(), lambda c: get_page(c, "/__asynctrace/traces"), host="203.0.113.9")
    assert r.status_code == 404 and r.text == "Not Found"  # the app's own 404


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
    r = call(app, lambda c: get_page(c, "/hello", ON))
    assert r.status_code == 200 and r.text == "hello" and len(got) == 1
    assert list(failure_counts().values()) == [1]
