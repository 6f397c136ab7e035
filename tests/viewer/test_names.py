"""The viewer names and measures what it draws as the analysis does: timers, futures, bodies,
bubbles, lanes, blocked steps, collections, work after the response."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import sys
import time
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_asynctrace import (
    AsyncTraceMiddleware,
    Trace,
    analyze,
    load_trace,
)
from asgi_asynctrace._viewer import write_viewer
from tests.viewer.pages import NEEDS_CHROMIUM, off_loop, opened, shoot

pytestmark = NEEDS_CHROMIUM


def test_a_deadline_not_reached_shows_no_wait_as_the_analysis_counts_it(
    page: Any, tmp_path: Path
) -> None:
    async def body() -> None:
        await asyncio.wait_for(asyncio.sleep(0.02), timeout=5)
        asyncio.get_running_loop().call_later(30, print)  # set for after the request
        expiry = asyncio.get_running_loop().call_later(30, print)
        await asyncio.sleep(0.005)
        expiry.cancel()  # as a delete cancels an entry's expiry

    trace = off_loop(body)
    opened(page, tmp_path, trace, "tree")
    times = analyze(trace).times
    timers = [times[r.async_id] for r in trace.resources if r.type == "timer"]
    sleep = next(t for t in timers if t.label.startswith("sleep"))
    later = next(t for t in timers if t.label.startswith("call_later") and t.state == "pending")
    gone = next(t for t in timers if t.label.startswith("call_later") and t.state == "cancelled")
    deadline = next(t for t in timers if t.label.startswith(("wait_for", "timeout")))
    assert deadline.state == "cancelled" and deadline.wait == 0 and sleep.wait >= 19 * 10**6
    assert later.wait == 0 and gone.wait == 0 and gone.ended - gone.created >= 4 * 10**6

    def shown(t: Any) -> str:
        return str(page.inner_text(f'#tree .node[data-id="{t.async_id}"] .t'))

    assert shown(deadline).startswith("wait 0 ns"), shown(deadline)
    assert shown(later).startswith("wait 0 ns"), shown(later)
    assert shown(gone).startswith("wait 0 ns"), shown(gone)
    assert shown(sleep).startswith("wait ") and " ms" in shown(sleep).split("·")[0]


def test_a_timer_is_named_by_its_delay_as_in_the_analysis(page: Any, tmp_path: Path) -> None:
    trace = Trace.start(request={"method": "GET", "path": "/timers"})
    delays = {"timeout": 19.993, "sleep": 10.5, "call_later": 30000, "timer": 0.04}
    for kind, delay in delays.items():
        timer = trace.add("timer", 1, None, trace.origin + 1000)
        assert timer is not None
        trace.annotate(timer, "kind", kind)
        trace.annotate(timer, "delayMs", delay)
    trace.finish(trace.origin + 10**6)
    opened(page, tmp_path, trace, "tree")
    times = analyze(trace).times
    timers = [r for r in trace.resources if r.type == "timer"]
    shown = [page.inner_text(f'#tree .node[data-id="{r.async_id}"] .label') for r in timers]
    assert shown == [times[r.async_id].label for r in timers]
    assert shown[0] == "timeout 20.0ms" and shown[3] == "timer 0.04ms"


def test_a_future_is_named_by_the_function_that_made_it_as_in_the_analysis(
    page: Any, tmp_path: Path
) -> None:
    async def body() -> None:
        event = asyncio.Event()
        asyncio.get_running_loop().call_soon(event.set)
        await event.wait()

    trace = off_loop(body, futures=True)
    opened(page, tmp_path, trace, "tree")
    future = next(r for r in trace.resources if r.type == "future")
    label = "Event.wait" if sys.version_info >= (3, 11) else "wait"
    assert analyze(trace).times[future.async_id].label == label
    shown = page.inner_text(f'#tree .node[data-id="{future.async_id}"] .label')
    assert shown == label


def test_bodies_and_websocket_messages_are_named_as_in_the_analysis(
    page: Any, tmp_path: Path
) -> None:
    from tests.test_streams import chat_trace, upload_trace

    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # off the page's loop
        traces = [pool.submit(upload_trace).result()[0], pool.submit(chat_trace).result()[0]]
    for i, trace in enumerate(traces):
        path = tmp_path / f"trace{i}.html"
        write_viewer(path, [trace])
        page.goto(path.as_uri())
        page.wait_for_selector("body[data-loaded]")
        page.click("#tabs button[data-view=tree]")
        times = analyze(trace).times
        wanted = [r for r in trace.resources if r.type in ("stream-read", "stream-write",
                                                           "websocket")]  # fmt: skip
        assert len(wanted) >= 2
        for r in wanted:
            shown = page.inner_text(f'#tree .node[data-id="{r.async_id}"] .label')
            assert shown == times[r.async_id].label, r.type
            assert "bytes" in shown or shown == "send close"


def _query_per_row_trace() -> Trace:
    """A fixed trace: four queries each followed by a connection's close, one after another,
    then 30 ms of the request's own code, then its response body."""
    ms = 1_000_000
    resources: list[dict[str, Any]] = []
    notes: list[dict[str, Any]] = []

    def add(rid: int, rtype: str, start: int, end: int, **more: Any) -> None:
        resources.append({"asyncId": rid, "triggerId": 0 if rid == 1 else 1, "type": rtype,
                          "stackTraceId": None, "createdAt": start, "destroyedAt": end,
                          "callbacks": more.pop("callbacks", []), "state": "ok"})  # fmt: skip
        notes.extend({"asyncId": rid, "key": k, "value": v} for k, v in more.items())

    root_steps = [[0, ms // 10]]
    for i in range(4):
        add(2 + 2 * i, "db-query", (1 + 4 * i) * ms, (3 + 4 * i) * ms,
            statement="select name from items where id = ?")  # fmt: skip
        add(3 + 2 * i, "task", (3 + 4 * i) * ms + ms // 10, (4 + 4 * i) * ms, coroutine="close")
        if i < 3:  # a moment's own code between them
            root_steps.append([(4 + 4 * i) * ms + ms // 20, (4 + 4 * i) * ms + ms // 10])
    root_steps.append([17 * ms, 47 * ms])
    add(10, "stream-write", 47 * ms, 48 * ms, callbacks=[[47 * ms, 48 * ms]], bytes=5)
    resources.insert(0, {"asyncId": 1, "triggerId": 0, "type": "root", "stackTraceId": None,
                         "createdAt": 0, "destroyedAt": 48 * ms, "callbacks": root_steps,
                         "state": "ok"})  # fmt: skip
    notes += [{"asyncId": 1, "key": "method", "value": "GET"},
              {"asyncId": 1, "key": "path", "value": "/rows"}]  # fmt: skip
    doc = {"version": 1, "traceId": "ab" * 16, "request": {"method": "GET", "path": "/rows"},
           "requestDurationNs": 48 * ms, "resources": resources, "annotations": notes,
           "stackTraces": []}  # fmt: skip
    return load_trace(json.dumps(doc).encode())


def test_the_summary_bar_says_what_held_the_request_up_as_the_analysis_does(
    page: Any, tmp_path: Path
) -> None:
    from asgi_asynctrace._report import path_runs

    trace = _query_per_row_trace()
    opened(page, tmp_path, trace)
    items = page.locator("#path li")
    shown = [items.nth(i).inner_text() for i in range(items.count())]
    assert len(shown) == 3, shown
    queries = "db-query select name from items where id = ?, then task close"
    assert shown[0].endswith(f"4 \u00d7 {queries}")
    assert shown[1].endswith("the request's own code ran 30.0 ms")
    assert shown[2].endswith("stream-write response body, 5 bytes")
    # the same runs as the analysis groups them (the Python side prints them in `summary`)
    runs = path_runs([s for s in analyze(trace).critical_path if s.depth == 0])
    assert [(int(items.nth(i).get_attribute("data-id") or 0),
             int(items.nth(i).get_attribute("data-reps") or 0)) for i in range(len(shown))] == [
        (r.steps[0].async_id, r.reps) for r in runs
    ]  # fmt: skip
    assert [r.reps for r in runs] == [4, 1, 1]
    items.nth(1).click()  # opens the step's resource: the request itself
    assert page.inner_text("#details h2") == "root GET /rows"


def test_a_bubble_is_named_after_the_work_not_the_timers_around_it(
    page: Any, tmp_path: Path
) -> None:
    # An aiocache set as the sample app makes it: the app's cache-put, then inside the library
    # a task doing the work, wait_for's deadline around it, which lives a little longer, and
    # the entry's expiry, still pending when the request ends.
    lib = ["wait_for @ <stdlib>/asyncio/tasks.py:479:12",
           "BaseCache.get @ site-packages/aiocache/base.py:44:20",
           "load @ shop/views.py:10:5"]  # fmt: skip
    doc = {
        "version": 1, "traceId": "ab" * 16, "request": {"method": "GET", "path": "/items"},
        "requestDurationNs": 12_000_000,
        "resources": [
            {"asyncId": 1, "triggerId": 0, "type": "root", "stackTraceId": None, "createdAt": 0,
             "callbacks": [[0, 500_000]], "destroyedAt": 12_000_000, "state": "ok"},
            {"asyncId": 2, "triggerId": 1, "type": "cache-get", "stackTraceId": 0,
             "createdAt": 600_000, "callbacks": [], "destroyedAt": 10_500_000, "state": "ok"},
            {"asyncId": 3, "triggerId": 2, "type": "timer", "stackTraceId": 1,
             "createdAt": 1_000_000, "callbacks": [], "destroyedAt": 10_000_000,
             "state": "cancelled"},
            {"asyncId": 4, "triggerId": 2, "type": "task", "stackTraceId": 1,
             "createdAt": 1_100_000, "callbacks": [[1_200_000, 1_300_000]],
             "destroyedAt": 9_900_000, "state": "ok"},
            {"asyncId": 5, "triggerId": 4, "type": "timer", "stackTraceId": 2,
             "createdAt": 1_250_000, "callbacks": [], "destroyedAt": None,
             "state": "pending"},
        ],
        "stackTraces": [{"id": 0, "frames": lib[2:]}, {"id": 1, "frames": lib},
                        {"id": 2, "frames": ["SimpleMemoryBackend._set @ "
                                             "site-packages/aiocache/backends/memory.py:50:9",
                                             *lib[1:]]}],
        "annotations": [
            {"asyncId": 3, "key": "kind", "value": "wait_for"},
            {"asyncId": 3, "key": "delayMs", "value": 5000},
            {"asyncId": 4, "key": "coroutine", "value": "BaseCache.get"},
            {"asyncId": 5, "key": "kind", "value": "call_later"},
            {"asyncId": 5, "key": "delayMs", "value": 30000},
        ],
    }  # fmt: skip
    opened(page, tmp_path, load_trace(doc))
    labels = page.locator(".bubble text.label").all_text_contents()
    assert "task BaseCache.get + 2 more" in labels, labels


def test_a_library_bubble_is_named_after_the_queries_in_it_with_their_count(
    page: Any, tmp_path: Path
) -> None:
    # Twenty queries as a database driver makes them, each with a future it waits on, and a
    # task that closes the connection after each, which lives longer and runs more than any
    # one query: the bubble a user sees at the top must say it holds the queries, how many,
    # and show it even when their text is long.
    query = "ConnectionEvents.wrap @ site-packages/sqlalchemy/engine/events.py:185:21"
    driver = "Connection._execute @ site-packages/aiosqlite/core.py:156:18"
    close = "create_task @ <stdlib>/asyncio/tasks.py:384:16"
    statement = "select name, price, stock from items where id = ?"
    resources: list[dict[str, Any]] = [
        {"asyncId": 1, "triggerId": 0, "type": "root", "stackTraceId": None, "createdAt": 0,
         "callbacks": [[0, 500_000]], "destroyedAt": 30_000_000, "state": "ok"},
    ]  # fmt: skip
    annotations: list[dict[str, Any]] = []
    for i in range(20):
        at, base = 1_000_000 + i * 1_000_000, 10 + 3 * i
        resources += [
            {"asyncId": base, "triggerId": 1, "type": "db-query", "stackTraceId": 0,
             "createdAt": at, "callbacks": [], "destroyedAt": at + 200_000, "state": "ok"},
            {"asyncId": base + 1, "triggerId": base, "type": "future", "stackTraceId": 1,
             "createdAt": at + 10_000, "callbacks": [], "destroyedAt": at + 190_000,
             "state": "ok"},
            {"asyncId": base + 2, "triggerId": 1, "type": "task", "stackTraceId": 2,
             "createdAt": at + 200_000, "callbacks": [[at + 210_000, at + 400_000]],
             "destroyedAt": at + 900_000, "state": "ok"},
        ]  # fmt: skip
        annotations += [
            {"asyncId": base, "key": "statement", "value": statement},
            {"asyncId": base + 2, "key": "coroutine", "value": "AsyncConnection.close"},
        ]
    doc = {
        "version": 1, "traceId": "cd" * 16, "request": {"method": "GET", "path": "/report"},
        "requestDurationNs": 30_000_000, "resources": resources, "annotations": annotations,
        "stackTraces": [{"id": 0, "frames": [query, "report @ shop/views.py:12:5"]},
                        {"id": 1, "frames": [driver, query, "report @ shop/views.py:12:5"]},
                        {"id": 2, "frames": [close, "AsyncConnection.close @ "
                                             "site-packages/sqlalchemy/ext/asyncio/engine.py:9:1",
                                             "report @ shop/views.py:12:5"]}],
    }  # fmt: skip
    opened(page, tmp_path, load_trace(doc))
    labels = page.locator(".bubble text.label").all_text_contents()
    assert len(labels) == 2, labels  # the request, and the driver's one cluster
    named, times = labels[1], "\N{MULTIPLICATION SIGN}"
    assert named.startswith("db-query select name") and named.endswith(f" {times}20 + 40 more")
    assert len(named) <= 40, named  # shortened in the statement, not in the counts
    full = page.locator(".bubble title").nth(1).text_content() or ""
    assert full.startswith(f"db-query {statement} {times}20 + 40 more"), full


def test_each_library_the_app_called_is_a_bubble_of_its_own(page: Any, tmp_path: Path) -> None:
    # A fetch through httpx (with a future anyio made under it) and two queries through
    # SQLAlchemy, all made by the request itself: two libraries, two bubbles, each saying
    # which library it is; the future goes with the fetch that httpx made it for.
    app = "report @ shop/views.py:12:5"
    fetch = "AsyncClient.send @ site-packages/httpx/_client.py:1629:16"
    anyio = "Event.wait @ site-packages/anyio/_backends/_asyncio.py:1700:13"
    query = "ConnectionEvents.wrap @ site-packages/sqlalchemy/engine/events.py:185:21"
    doc = {
        "version": 1, "traceId": "ef" * 16, "request": {"method": "GET", "path": "/report"},
        "requestDurationNs": 20_000_000,
        "resources": [
            {"asyncId": 1, "triggerId": 0, "type": "root", "stackTraceId": None, "createdAt": 0,
             "callbacks": [[0, 500_000]], "destroyedAt": 20_000_000, "state": "ok"},
            {"asyncId": 2, "triggerId": 1, "type": "fetch", "stackTraceId": 0,
             "createdAt": 600_000, "callbacks": [], "destroyedAt": 9_000_000, "state": "ok"},
            {"asyncId": 3, "triggerId": 2, "type": "future", "stackTraceId": 1,
             "createdAt": 700_000, "callbacks": [], "destroyedAt": 8_900_000, "state": "ok"},
            {"asyncId": 4, "triggerId": 1, "type": "db-query", "stackTraceId": 2,
             "createdAt": 9_100_000, "callbacks": [], "destroyedAt": 12_000_000, "state": "ok"},
            {"asyncId": 5, "triggerId": 1, "type": "db-query", "stackTraceId": 2,
             "createdAt": 12_100_000, "callbacks": [], "destroyedAt": 15_000_000, "state": "ok"},
        ],
        "stackTraces": [{"id": 0, "frames": [fetch, app]},
                        {"id": 1, "frames": [anyio, fetch, app]},
                        {"id": 2, "frames": [query, app]}],
        "annotations": [
            {"asyncId": 2, "key": "method", "value": "GET"},
            {"asyncId": 2, "key": "url", "value": "http://users/api/user"},
            {"asyncId": 4, "key": "statement", "value": "select 1"},
            {"asyncId": 5, "key": "statement", "value": "select 1"},
        ],
    }  # fmt: skip
    opened(page, tmp_path, load_trace(doc))
    labels = page.locator(".bubble text.label").all_text_contents()
    subs = page.locator(".bubble text.sub").all_text_contents()
    assert len(labels) == 3, labels  # the request, httpx's bubble, SQLAlchemy's bubble
    by_label = dict(zip(labels, subs, strict=True))
    fetch_bubble = next(label for label in labels if label.startswith("fetch GET"))
    assert fetch_bubble.endswith(" + 1 more")  # the fetch and anyio's future under it
    assert by_label[fetch_bubble].startswith("httpx · ")
    queries = next(label for label in labels if label.startswith("db-query select 1"))
    assert by_label[queries].startswith("sqlalchemy · ") and "\N{MULTIPLICATION SIGN}2" in queries
    assert by_label[labels[0]].startswith("app · ")


def test_the_timeline_shades_a_lane_while_it_held_the_request_up(page: Any, tmp_path: Path) -> None:
    # A task the request waited on from 0.5 ms to 27.95 ms, then the request's own code from
    # 28 to 29 ms: the root's lane is shaded there, not over its whole life.
    ms = 1_000_000
    doc = {
        "version": 1, "traceId": "aa" * 16, "request": {"method": "GET", "path": "/x"},
        "requestDurationNs": 30 * ms, "stackTraces": [], "annotations": [],
        "resources": [
            {"asyncId": 1, "triggerId": 0, "type": "root", "stackTraceId": None, "createdAt": 0,
             "callbacks": [[0, ms], [28 * ms, 29 * ms]], "destroyedAt": 30 * ms, "state": "ok"},
            {"asyncId": 2, "triggerId": 1, "type": "task", "stackTraceId": None,
             "createdAt": ms // 2, "callbacks": [[600_000, 700_000], [27_500_000, 27_900_000]],
             "destroyedAt": 27_950_000, "state": "ok"},
        ],
    }  # fmt: skip
    trace = load_trace(doc)
    spans = {(s.async_id, s.start, s.end) for s in analyze(trace).critical_path}
    assert spans == {(2, ms // 2, 27_950_000), (1, 28 * ms, 29 * ms)}
    opened(page, tmp_path, trace, "timeline")
    # the pixel on the lane's top row, above its bars and their outline, at a moment
    # (timeline.js: lanes of 16 px under a 22 px axis, times from x = 260 to 10 px short of the
    # canvas's right edge)
    pixel = """([lane, t, duration]) => {
        const c = document.getElementById("timeline"), r = window.devicePixelRatio || 1;
        const x = 260 + (t / duration) * (c.width / r - 270), y = 22 + lane * 16;
        return Array.from(c.getContext("2d").getImageData(
            Math.round(x * r), Math.round(y * r), 1, 1).data);
    }"""
    page.wait_for_selector("#timeline[data-lanes='2']")
    shaded = page.evaluate(pixel, [0, 28.5 * ms, 30 * ms])
    assert shaded[3] > 0 and shaded[0] > shaded[1], shaded  # reddish: it held the request up
    assert page.evaluate(pixel, [0, 12.5 * ms, 30 * ms])[3] == 0  # not then: the task did
    assert page.evaluate(pixel, [1, 12.5 * ms, 30 * ms])[3] > 0


async def _blocks_the_loop() -> None:
    await asyncio.sleep(0)
    time.sleep(0.15)  # the line the viewer must show


def test_a_blocked_loop_finding_shows_where_and_opens_the_stacks_of_it(
    page: Any, tmp_path: Path
) -> None:
    trace = off_loop(_blocks_the_loop)
    assert trace.samples, "the watchdog took no sample of a 150 ms blocking step"
    frame = trace.samples[0][2][0]
    assert frame.startswith("_blocks_the_loop @ tests/viewer/test_names.py:")
    opened(page, tmp_path, trace)
    finding = page.locator("#findings li.finding", has_text="blocked-loop")
    assert finding.locator(".site").inner_text() == f" at {frame}"
    finding.click()
    assert page.inner_text("#details h2") == "root GET /"
    blocked = page.inner_text("#details-blocked")
    start = trace.root.intervals()[1][0]
    first = (trace.samples[0][1] - start) / 1e6
    assert f"{first:.1f} ms into the step" in blocked
    assert f"  {frame}   [app]" in blocked
    assert blocked.count("into the step") == len(trace.samples)
    shoot(page, "blocked-loop")
    page.locator("#details button").click()
    page.click("#tabs button[data-view=timeline]")  # a notch per sample on the root's lane
    assert page.get_attribute("#timeline", "data-blocked") == str(len(trace.samples))
    shoot(page, "blocked-loop-timeline")
    # A resource the watchdog never sampled has no such section.
    page.click("#tabs button[data-view=tree]")
    page.locator("#tree .node", has_text="stream-write").first.click()
    assert page.locator("#details-blocked").count() == 0


def test_a_garbage_collection_is_named_by_its_generation_as_in_the_analysis(
    page: Any, tmp_path: Path
) -> None:
    trace = Trace.start(request={"method": "GET", "path": "/gc"})
    o = trace.origin
    trace.root.callbacks[:] = [o, o + 30_000_000]
    collection = trace.add("gc", 1, None, o + 1_000_000)
    assert collection is not None
    trace.begin(collection, o + 1_000_000)
    trace.end(collection, o + 29_000_000)
    trace.settle(collection, o + 29_000_000, "ok")
    trace.annotate(collection, "generation", 2)
    trace.annotate(collection, "collected", 0)
    trace.finish(o + 30_000_000)
    opened(page, tmp_path, trace, "tree")
    shown = page.inner_text(f'#tree .node[data-id="{collection.async_id}"] .label')
    assert shown == analyze(trace).times[collection.async_id].label == "generation 2"
    assert "28.0 ms of it in garbage collection (generation 2)" in page.inner_text("#findings")


def test_work_after_the_response_is_told_apart_in_the_summary_and_the_timeline(
    page: Any, tmp_path: Path
) -> None:
    from starlette.background import BackgroundTask

    from asgi_asynctrace import capture_traces
    from tests.helpers import call

    async def receipt() -> None:
        await asyncio.sleep(0.030)  # after the response: no client waits for it

    async def pay(request: Request) -> Response:
        return PlainTextResponse("paid", background=BackgroundTask(receipt))

    app = AsyncTraceMiddleware(Starlette(routes=[Route("/pay", pay)]), log_traces=False)

    def made() -> Trace:
        with capture_traces() as traces:
            call(app, lambda c: c.get("/pay", headers={"X-Async-Trace": "1"}))
        return traces[0]

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        trace = pool.submit(made).result()
    answered = analyze(trace).answered
    opened(page, tmp_path, trace, "timeline")
    text = page.inner_text("#answered")
    assert text.startswith("response sent at ") and text.endswith(" more after it"), text
    assert page.get_attribute("#timeline", "data-answered") == str(answered)
    shoot(page, "after-the-response")
