"""The viewer served by the middleware from its store: the list, routes, live traces."""

from __future__ import annotations

import re
from typing import Any

import httpx

from tests.viewer.pages import NEEDS_CHROMIUM, shoot

pytestmark = NEEDS_CHROMIUM


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


def test_a_request_kept_waiting_links_to_the_request_that_held_the_loop(page: Any) -> None:
    import asyncio
    import concurrent.futures

    from tests.servers import serving
    from tests.test_blockers import blocking_app

    async def both(base: str) -> tuple[str, str]:
        on = {"X-Async-Trace": "1"}
        async with httpx.AsyncClient(base_url=base) as c:
            blocked, waited = await asyncio.gather(c.get("/block", headers=on),
                                                   c.get("/wait", headers=on))  # fmt: skip
        return blocked.headers["x-async-trace-id"], waited.headers["x-async-trace-id"]

    with serving(blocking_app()) as base:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # (Playwright's loop is here)
            block_id, wait_id = pool.submit(asyncio.run, both(base)).result()
        page.goto(f"{base}/__asynctrace/?id={wait_id}")
        page.wait_for_selector(f"body[data-loaded='{wait_id}']")
        held = page.locator("#findings .held-by")
        assert held.count() == 1
        assert held.inner_text().startswith("held by GET /block: ran ")
        assert "tests/test_blockers.py:" in held.inner_text()
        shoot(page, "held-by")
        held.locator("a").click()  # opens the trace of the request that held the loop
        page.wait_for_selector(f"body[data-loaded='{block_id}']")
        assert "GET /block 200" in page.inner_text("#summary")
        assert "blocked-loop" in page.inner_text("#findings")
