"""What the viewer's tests share: Chromium's place and flags, a trace written to a viewer page
and opened, and a sample trace.

    opened(page, tmp_path, sample(), view="timeline")   # then query the page
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
from pathlib import Path
from typing import Any

import pytest

from asgi_asynctrace import (
    Trace,
    annotate,
    start_resource,
)
from asgi_asynctrace._viewer import write_viewer
from tests.helpers import traced

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
SHOTS = Path(__file__).resolve().parent.parent.parent / "build" / "screenshots"
HOSTILE = '<img src=x onerror="window.__pwned = 1">'
NEEDS_CHROMIUM = pytest.mark.skipif(
    not os.path.exists(CHROMIUM) and not os.environ.get("CI"),
    reason=f"needs Chromium at {CHROMIUM}: apt-get install -y chromium",
)


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
