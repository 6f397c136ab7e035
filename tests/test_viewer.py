"""The viewer in a real headless Chromium: written to a file, and served by the middleware."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_asynctrace import (
    AnalysisSettings,
    AsyncTraceMiddleware,
    Trace,
    analyze,
    annotate,
    load_trace,
    start_resource,
)
from asgi_asynctrace._viewer import write_viewer
from tests.helpers import traced
from tests.servers import serving

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
SHOTS = Path(__file__).resolve().parent.parent / "build" / "screenshots"
HOSTILE = '<img src=x onerror="window.__pwned = 1">'

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM) and not os.environ.get("CI"),
    reason=f"needs Chromium at {CHROMIUM}: apt-get install -y chromium",
)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield instance
        instance.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    page.close()
    assert errors == [], errors


def shoot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"))


def opened(page: Any, tmp_path: Path, trace: Trace, view: str | None = None) -> None:
    """``trace`` written as one viewer page and opened in ``page`` (on ``view``, if given)."""
    path = tmp_path / "trace.html"
    write_viewer(path, [trace])
    page.goto(path.as_uri())
    page.wait_for_selector("body[data-loaded]")
    if view is not None:
        page.click(f"#tabs button[data-view={view}]")


def off_loop(body: Any, futures: bool = False) -> Trace:
    """Trace ``body`` in a thread: Playwright's sync API keeps a loop running on this one."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(traced, body, futures).result()


def sample() -> Trace:
    async def leaf(ms: int) -> None:
        annotate("ms", ms)
        await asyncio.sleep(ms / 1000)

    async def body() -> None:
        async with start_resource("cache-get", op="get", key="user:1") as scope:
            scope.annotate("hit", False)
        await asyncio.gather(leaf(3), leaf(6))
        await asyncio.to_thread(time.sleep, 0.002)

    return off_loop(body)


def test_each_view_draws_the_trace_written_to_a_file(page: Any, tmp_path: Path) -> None:
    trace = sample()
    opened(page, tmp_path, trace)
    assert trace.trace_id in page.inner_text("#summary")
    assert page.get_attribute("#bubbles", "data-bubbles") is not None
    labels = page.locator(".bubble text.label").all_text_contents()
    assert any(label.startswith("root GET /") for label in labels)
    shoot(page, "bubbles")

    # click the root's bubble: it opens into its members, with a breadcrumb back out
    before = page.locator(".crumbs a").count()
    page.locator(".bubble").first.click()
    assert page.locator(".crumbs a").count() == before + 1
    inner = int(page.get_attribute("#bubbles", "data-bubbles") or 0)
    assert inner >= 2
    page.locator(".crumbs a").first.click()
    assert page.locator(".crumbs a").count() == before

    page.click("#tabs button[data-view=timeline]")
    lanes = [r for r in trace.resources if r.type != "future"]
    assert page.get_attribute("#timeline", "data-lanes") == str(len(lanes))
    page.check("#tl-futures")
    assert page.get_attribute("#timeline", "data-lanes") == str(len(trace.resources))
    shoot(page, "timeline")

    page.click("#tabs button[data-view=tree]")
    assert page.locator("#tree .node").count() == len(trace.resources)
    critical = analyze(trace).critical_path
    assert page.locator("#tree .node.critical").count() == len({s.async_id for s in critical})
    page.fill("#tree-search", "user:1")
    assert page.get_attribute("#view-tree", "data-matches") == "1"
    page.fill("#tree-search", "")
    page.select_option("#tree-type", "task")
    assert page.get_attribute("#view-tree", "data-matches") == "2"
    assert not page.locator("#tree .node", has_text="user:1").first.is_visible()
    page.select_option("#tree-type", "")
    page.locator("#tree .node", has_text="user:1").first.click()
    assert "user:1" in page.inner_text("#details-notes")
    shoot(page, "tree")


def test_a_hostile_string_in_a_trace_is_shown_as_text_and_runs_nothing(
    page: Any, tmp_path: Path
) -> None:
    async def body() -> None:
        annotate("note", HOSTILE)
        async with start_resource("fetch", method="GET", url=HOSTILE):
            await asyncio.sleep(0)

    trace = off_loop(body)
    trace.request["path"] = "/</script><script>window.__pwned = 2</script>"
    path = tmp_path / "hostile.html"
    write_viewer(path, [trace])
    page.goto(path.as_uri())
    page.wait_for_selector("body[data-loaded]")
    for view in ("bubbles", "timeline", "tree"):
        page.click(f"#tabs button[data-view={view}]")
    page.locator("#tree .node", has_text="fetch").first.click()
    assert HOSTILE in page.inner_text("#details-notes")
    assert "</script>" in page.inner_text("#summary")
    assert page.evaluate("window.__pwned") is None
    assert page.locator("img").count() == 0


def test_pasted_seed_json_loads_and_bad_input_says_what_is_wrong(page: Any, tmp_path: Path) -> None:
    path = tmp_path / "empty.html"
    write_viewer(path, [])
    page.goto(path.as_uri())
    page.click("#tabs button[data-view=load]")
    page.fill("#paste", '{"resources": [{"asyncId": "x"}], "requestDurationNs": 5}')
    page.click("#paste-load")
    assert "asyncId and triggerId must be integers" in page.inner_text("#load-error")
    seed = json.dumps({
        "requestDurationNs": 2000, "stackTraces": [], "annotations": [],
        "resources": [
            {"asyncId": 1, "triggerId": 0, "type": "kRoot", "createdAt": 0, "stackTraceId": 0,
             "callbackStartedAt": 0, "callbackEndedAt": 1500, "destroyedAt": 0},
            {"asyncId": 2, "triggerId": 1, "type": "kCacheGet", "createdAt": 100,
             "stackTraceId": 0, "callbackStartedAt": 0, "callbackEndedAt": 0, "destroyedAt": 900},
        ],
    })  # fmt: skip
    page.fill("#paste", seed)
    page.click("#paste-load")
    page.wait_for_selector("body[data-loaded]")
    assert "2 resources" in page.inner_text("#summary")
    page.click("#tabs button[data-view=tree]")
    assert page.locator("#tree .node .type").all_inner_texts() == ["root", "cache-get"]
    page.click("#tabs button[data-view=load]")
    page.click("#demo")
    assert "GET /items" in page.inner_text("#summary")

    # a log file chosen with the file picker: the trace line is found behind its prefix
    log = tmp_path / "server.log"
    golden = (Path(__file__).parent / "golden" / "checkout.json").read_text().replace("\n", "")
    log.write_text(f"INFO: started\nINFO: AsyncTrace completed; toJson() = {golden}\n")
    page.click("#tabs button[data-view=load]")
    page.set_input_files("#file", str(log))
    page.locator("#summary", has_text="/checkout").wait_for()  # (the page's CSP forbids eval)
    assert "POST /checkout 201" in page.inner_text("#summary")

    # the same, dropped onto the drop zone (after the demo, so the drop is what changes it)
    page.click("#tabs button[data-view=load]")
    page.click("#demo")
    assert "/checkout" not in page.inner_text("#summary")
    page.click("#tabs button[data-view=load]")
    dropped = page.evaluate_handle(
        """(text) => { const data = new DataTransfer();
             data.items.add(new File([text], "trace.json", { type: "application/json" }));
             return data; }""",
        golden,
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": dropped})
    page.locator("#summary", has_text="/checkout").wait_for()  # (the page's CSP forbids eval)


@pytest.fixture
def served() -> Iterator[str]:
    async def slow(request: Request) -> Response:
        await asyncio.sleep(0.001)
        return PlainTextResponse("ok")

    # Chromium shares the two cores with this server, so a step can stretch past the default
    # 20 ms blocked-loop threshold; a high one keeps "no findings" about the page, not the CPU.
    app = AsyncTraceMiddleware(
        Starlette(routes=[Route("/work", slow)]),
        log_traces=False,
        analysis=AnalysisSettings(blocked_step_ms=5_000, loop_busy_ms=5_000),
    )
    with serving(app) as base:
        yield base


def test_the_app_serves_the_viewer_listing_its_recent_traces(page: Any, served: str) -> None:
    httpx.get(served + "/work", headers={"X-Async-Trace": "1"})
    response = httpx.get(served + "/__asynctrace/")
    assert response.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in response.headers["content-security-policy"]
    page.goto(served + "/__asynctrace/")
    page.wait_for_selector("#store-list a")
    page.locator("#store-list a").first.click()
    page.wait_for_selector("body[data-loaded]")
    assert "GET /work 200" in page.inner_text("#summary")
    assert "no findings" in page.inner_text("#findings")
    note = page.locator("#findings li").first  # a note, not a numbered finding
    assert note.evaluate("li => getComputedStyle(li).listStyleType") == "none"
    shoot(page, "served")

    # the page's address now names the trace: opened again (a shared link), it shows that one
    (first,) = httpx.get(served + "/__asynctrace/traces").json()["traces"]
    assert page.url == f"{served}/__asynctrace/?id={first['traceId']}"

    # the sample app's index links here with ?run=<path>: run it traced, show its trace
    page.goto(served + "/__asynctrace/?run=/work")
    page.wait_for_selector("body[data-loaded]")
    assert "GET /work 200" in page.inner_text("#summary")
    listed = httpx.get(served + "/__asynctrace/traces").json()["traces"]
    assert len(listed) == 2 and page.url.endswith(f"?id={listed[0]['traceId']}")
    page.goto(f"{served}/__asynctrace/?id={first['traceId']}")
    page.wait_for_selector(f"body[data-loaded='{first['traceId']}']")


def test_the_served_front_page_says_how_the_tracer_is_set_as_the_status_does(
    page: Any, served: str
) -> None:
    from asgi_asynctrace import reset_failures
    from asgi_asynctrace._failures import report

    status = httpx.get(served + "/__asynctrace/status").json()
    page.goto(served + "/__asynctrace/")
    page.wait_for_selector("#tracer-status:not([hidden])")
    line = page.inner_text("#tracer-status")
    assert line.startswith(f"tracer: process {status['pid']}, Python {status['python']}, ")
    assert "instrumentation on: " in line and line.endswith("tracer failures: none")
    try:
        report("viewer-test", ValueError("a failure of the tracer's own, made by the test"))
        page.reload()
        page.wait_for_selector("#tracer-status .failures")
        told = page.inner_text("#tracer-status .failures")
    finally:
        reset_failures()
    assert told == "tracer failures: 1 \u00d7 viewer-test (each in the app's log)"


def test_the_served_viewer_shows_traces_as_they_come(page: Any, served: str) -> None:
    first = httpx.get(served + "/work", headers={"X-Async-Trace": "1"})
    page.goto(served + "/__asynctrace/")
    page.wait_for_selector("#store-list a")
    assert page.locator("#store-list a").count() == 1
    assert page.locator("#routes tr.route td.n").first.inner_text() == "1"
    second = httpx.get(served + "/work", headers={"X-Async-Trace": "1"})
    assert second.headers["x-async-trace-id"] != first.headers["x-async-trace-id"]
    # no reload: the page looks again every 2 s while the list is on screen
    page.locator("#store-list li:nth-child(2) a").wait_for(timeout=6000)
    page.locator("#routes tr.route td.n", has_text=re.compile(r"^2$")).first.wait_for(timeout=6000)
    assert page.locator("#routes tr.route a.compare").count() == 1  # two of one route


def test_the_served_viewer_lists_routes_and_opens_a_routes_slowest_trace(
    page: Any, served: str
) -> None:
    for _ in range(3):
        httpx.get(served + "/work", headers={"X-Async-Trace": "1"})
    (route,) = httpx.get(served + "/__asynctrace/routes").json()["routes"]
    page.goto(served + "/__asynctrace/")
    row = page.locator("#routes tr.route")
    row.wait_for()
    cells = row.locator("td").all_inner_texts()
    assert cells[:2] == ["GET /work", "3"], cells
    assert "own code" in cells[4] or "timer" in cells[4], cells  # what held it up, by share
    assert cells[5] == "none"
    # the route's slowest trace against its typical one, as `compare` gives it
    comparison = route["comparison"]
    assert comparison["slower"]["traceId"] == route["slowestTraceId"]
    assert comparison["baseline"]["is"] == "typical"
    assert page.locator("#comparison").is_hidden()
    row.locator("a.compare").click()
    panel = page.locator("#comparison")
    panel.wait_for()
    text = panel.inner_text()
    assert text.startswith("GET /work: the slower "), text
    assert "what held it up (critical path)" in text and "null" not in text
    assert "findings only in the slower: none; only in the typical one: none" in text
    panel.locator("a", has_text="open the typical one").click()
    page.wait_for_selector(f"body[data-loaded='{comparison['baseline']['traceId']}']")
    page.click("#tabs button[data-view=load]")
    row.locator("a.open").click()
    page.wait_for_selector(f"body[data-loaded='{route['slowestTraceId']}']")
    assert "GET /work 200" in page.inner_text("#summary")


def test_a_file_of_several_traces_lists_them_and_their_routes(page: Any, tmp_path: Path) -> None:
    samples = Path(__file__).resolve().parent.parent / "sample_app" / "traces"
    traces = [load_trace((samples / f"{name}.json").read_bytes())
              for name in ("items", "slow", "fastapi-items-2")]  # fmt: skip
    path = tmp_path / "several.html"
    write_viewer(path, traces)
    page.goto(path.as_uri())
    page.wait_for_selector("body[data-loaded]")
    page.click("#tabs button[data-view=load]")
    assert page.inner_text("#store > h2") == "3 traces in this file"
    rows = page.locator("#routes tr.route")
    routes = [rows.nth(i).locator("td").first.inner_text() for i in range(rows.count())]
    by_p95 = sorted(traces, key=lambda t: -t.duration_ns)
    expected = [f"GET {t.annotations_of(1).get('route') or t.request['path']}" for t in by_p95]
    assert routes == expected
    assert "blocked-loop in 1 (high)" in rows.nth(routes.index("GET /slow")).inner_text()
    assert rows.locator("a.compare").count() == 0  # one trace a route: nothing to compare
    row = rows.nth(routes.index("GET /fastapi/items/{item_id}"))
    row.locator("a.open").click()
    page.wait_for_selector(f"body[data-loaded='{traces[2].trace_id}']")
    assert "GET /fastapi/items/2 200" in page.inner_text("#summary")
    assert page.inner_text("#summary .route") == "route /fastapi/items/{item_id}"
    page.click("#tabs button[data-view=load]")
    rows.nth(routes.index("GET /slow")).locator("a.open").click()  # a path: its own route
    page.wait_for_selector(f"body[data-loaded='{traces[1].trace_id}']")
    assert page.locator("#summary .route").count() == 0
    assert "null" not in page.inner_text("#summary")


def test_a_file_of_one_routes_traces_compares_the_slower_with_the_faster(
    page: Any, tmp_path: Path
) -> None:
    from tests.test_compare import QUERY, _traces

    # the same route: one query, then thirty, 58 ms apart, so that no stall of a busy machine
    # makes the first the slower (made in a thread of their own: Playwright's loop runs in
    # this one)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        one, thirty = pool.submit(_traces, 1, 30).result()
    path = tmp_path / "two.html"
    write_viewer(path, [one, thirty])
    page.goto(path.as_uri())  # no server: the comparison is in the page
    page.wait_for_selector("body[data-loaded]")
    page.click("#tabs button[data-view=load]")
    page.locator("#routes a.compare", has_text="compare with the faster").click()
    panel = page.locator("#comparison")
    text = panel.inner_text()
    assert text.startswith("GET /orders/{lines}/report: the slower "), text
    row = panel.locator("table.diff tr", has_text=f"db-query {QUERY}")
    cells = row.locator("td").all_inner_texts()
    assert (
        cells[1].startswith("1 \u00d7 ")
        and cells[2].startswith("30 \u00d7 ")
        and cells[3].endswith("(+29)")
    ), cells
    assert "findings only in the slower: n-plus-one" in text
    shoot(page, "compare")
    panel.locator("a", has_text="open the slower").click()
    page.wait_for_selector(f"body[data-loaded='{thirty.trace_id}']")


def test_a_trace_the_store_does_not_hold_says_why(browser: Any, served: str) -> None:
    # (its own page: the browser reports each of the store's 404s as a console error)
    page = browser.new_page()
    try:
        page.goto(f"{served}/__asynctrace/?id={'0' * 32}")
        said = page.locator("#load-error", has_text=f"trace {'0' * 32} never reached the store")
        said.wait_for()
        assert "keeps the last 100) of this process" in said.inner_text()
        assert "store_dir" in said.inner_text()  # the likeliest reason: another worker has it
    finally:
        page.close()


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
    assert frame.startswith("_blocks_the_loop @ tests/test_viewer.py:")
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

    from asgi_asynctrace import AsyncTraceMiddleware, capture_traces
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
