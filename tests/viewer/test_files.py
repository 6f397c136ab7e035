"""The viewer written to a file: each view, bad and hostile input, several traces."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from pathlib import Path
from typing import Any

from asgi_asynctrace import (
    analyze,
    annotate,
    load_trace,
    start_resource,
)
from asgi_asynctrace._viewer import write_viewer
from tests.viewer.pages import HOSTILE, NEEDS_CHROMIUM, off_loop, opened, sample, shoot

pytestmark = NEEDS_CHROMIUM


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
    golden = (
        (Path(__file__).parent.parent / "golden" / "checkout.json").read_text().replace("\n", "")
    )
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


def test_a_file_of_several_traces_lists_them_and_their_routes(page: Any, tmp_path: Path) -> None:
    samples = Path(__file__).resolve().parent.parent.parent / "sample_app" / "traces"
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
