"""The viewer's tests' fixtures: one headless Chromium per module, a page that fails its test
on any console error, and an app serving the viewer from its store."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_asynctrace import (
    AnalysisSettings,
    AsyncTraceMiddleware,
)
from tests.servers import serving
from tests.viewer.pages import ARGS, CHROMIUM


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
