"""How fast the viewer draws a big trace: 10,000 resources, first view, in headless Chromium.

    python -m benchmarks.bench_viewer        # needs /usr/bin/chromium and playwright

The trace is recorded for real (a request that starts 3,400 tasks, each with a timer and a
cache call, plus futures), written as the self-contained page, and opened five times; the
figure is the median time from navigation to the bubbles being drawn, then to each other view.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from asgi_asynctrace import Trace, TraceLimits, start_resource
from asgi_asynctrace._context import ACTIVE
from asgi_asynctrace._hooks import acquire_hooks
from asgi_asynctrace._viewer import write_viewer

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


async def _work(i: int) -> None:
    with start_resource("cache-get", key=f"item:{i}"):
        await asyncio.sleep(0)
    await asyncio.sleep(0.0001)


async def big_trace(tasks: int = 3_400) -> Trace:
    trace = Trace.start(request={"method": "GET", "path": "/big"},
                        limits=TraceLimits(max_resources=50_000))  # fmt: skip
    release = acquire_hooks(asyncio.get_running_loop())
    token = ACTIVE.set((trace, trace.root))
    try:
        await asyncio.gather(*(_work(i) for i in range(tasks)))
    finally:
        ACTIVE.reset(token)
        release()
    trace.finish(time.perf_counter_ns())
    return trace


def main() -> None:
    from playwright.sync_api import sync_playwright

    trace = asyncio.run(big_trace())
    page_path = Path(tempfile.mkdtemp()) / "big.html"
    write_viewer(page_path, [trace])
    first, timeline, tree = [], [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        for _ in range(5):
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            start = time.perf_counter()
            page.goto(page_path.as_uri())
            page.wait_for_selector("#bubbles")
            first.append(time.perf_counter() - start)
            start = time.perf_counter()
            page.click("#tabs button[data-view=timeline]")
            page.wait_for_selector("#timeline[data-lanes]")
            timeline.append(time.perf_counter() - start)
            start = time.perf_counter()
            page.click("#tabs button[data-view=tree]")
            page.wait_for_selector("#tree .node")
            tree.append(time.perf_counter() - start)
            page.close()
        browser.close()
    print(f"Python {sys.version.split()[0]}, Chromium headless; a trace of "
          f"{len(trace.resources)} resources ({page_path.stat().st_size // 1024} KiB page); "
          "medians of 5 loads\n")  # fmt: skip
    print("| measure | result | target |")
    print("|---|---|---|")
    print(f"| open the page to the bubbles drawn | {statistics.median(first):.2f} s | <= 2 s |")
    print(f"| switch to the timeline | {statistics.median(timeline):.2f} s | - |")
    print(f"| switch to the tree | {statistics.median(tree):.2f} s | - |")


if __name__ == "__main__":
    main()
