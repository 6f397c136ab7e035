"""The small Starlette app the middleware's tests serve, traced or not:

    r = call(traced_app(header_limit=0), lambda c: get_page(c, "/hello", ON))

Routes: ``/hello`` (a 1 ms sleep), ``/boom`` (raises), ``/big`` (300 annotations of 100
characters) and ``/background`` (a background task that annotates after the answer).
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_asynctrace import (
    AsyncTraceMiddleware,
    annotate,
)

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


async def get_page(c: httpx.AsyncClient, path: str, headers: dict[str, str] | None = None) -> Any:
    return await c.get(path, headers=headers or {})
