"""A Starlette app that does a little of everything the tracer records, one route per pattern.

    python -m sample_app            # or: uvicorn sample_app.app:app
    curl -si -H 'X-Async-Trace: 1' http://127.0.0.1:8000/items

The index page lists every route with a link that runs it traced and opens its trace in the
viewer. The same routes are mounted under /fastapi from a FastAPI app (sample_app.fastapi_app).
"""

from __future__ import annotations

import asyncio
import html
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from asgi_asynctrace import AsyncTraceMiddleware

from . import patterns as p
from .fastapi_app import api

ROUTES = {
    "/items": "cache-aside load (cache miss → SQL → cache put), then prices fetched in parallel",
    "/sequential": "the same prices fetched one after another (the analyzer names it)",
    "/parallel": "three fetches with asyncio.gather",
    "/race": "wait(FIRST_COMPLETED) and as_completed over fetches",
    "/nested": "tasks three deep",
    "/iteration": "async iteration over an async generator",
    "/timers": "call_later, a wait_for timing out, a sleep",
    "/cache": "a cache miss, a put, a hit, a delete",
    "/sql": "SQL through SQLAlchemy's async engine",
    "/sync": "a sync endpoint, run in the thread pool",
    "/stream": "a streamed response",
    "/slow": "the planted problems: a price fetched twice, a query per order line, a blocking call",
    "/chat": "a websocket chat room (the trace of each connection)",
    "/fastapi/items": "the same, from the FastAPI app",
    "/fastapi/items/2": "one item by its id: traced as the route /fastapi/items/{item_id}",
}


async def items(request: Request) -> Response:
    rows = await p.load_items()
    return JSONResponse({"items": rows, "prices": await p.prices_in_parallel(rows)})


async def sequential(request: Request) -> Response:
    rows = await p.load_items()
    return JSONResponse({"prices": await p.prices_one_by_one(rows)})


async def parallel(request: Request) -> Response:
    return JSONResponse({"prices": await asyncio.gather(*(p.price(i) for i in (1, 2, 3)))})


async def race(request: Request) -> Response:
    return JSONResponse(await p.race())


async def nested(request: Request) -> Response:
    return JSONResponse({"depth": await p.nested(3)})


async def iteration(request: Request) -> Response:
    return JSONResponse({"ticks": [i async for i in p.ticks(4)]})


async def timers(request: Request) -> Response:
    return JSONResponse(await p.timers())


async def cache(request: Request) -> Response:
    return JSONResponse(await p.cache_hit_and_miss())


async def sql(request: Request) -> Response:
    return JSONResponse({"items": await p.query_items()})


def sync_report(request: Request) -> Response:
    return JSONResponse({"rows": p.report_rows()})


async def stream(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        async for i in p.ticks(3):
            yield f"chunk {i}\n".encode()

    return StreamingResponse(chunks(), media_type="text/plain")


async def slow(request: Request) -> Response:
    return JSONResponse(await p.slow_report())


class ChatRoom:
    """Everyone connected to /ws hears what anyone says."""

    def __init__(self) -> None:
        self.members: set[WebSocket] = set()

    async def join(self, ws: WebSocket) -> None:
        await ws.accept()
        self.members.add(ws)
        try:
            while True:
                said = await ws.receive_text()
                await asyncio.gather(*(m.send_text(said) for m in list(self.members)))
        except WebSocketDisconnect:
            pass
        finally:
            self.members.discard(ws)


room = ChatRoom()

CHAT_PAGE = """<!doctype html><meta charset=utf-8><title>chat</title>
<p>A connection is traced when its handshake carries <code>X-Async-Trace: 1</code>, which a
browser cannot send: connect with a client such as <code>python -m websockets</code> or
<code>websocat -H 'X-Async-Trace: 1' ws://{host}/ws</code>, and its trace appears in
<a href="/__asynctrace/">the viewer</a> when it leaves.</p>
<ol id=log></ol><input id=say placeholder="say something" autofocus>
<script>
const ws = new WebSocket(`ws://${location.host}/ws`);
ws.onmessage = (e) => { const li = document.createElement("li"); li.textContent = e.data;
  document.getElementById("log").append(li); };
document.getElementById("say").onkeydown = (e) => {
  if (e.key === "Enter") { ws.send(e.target.value); e.target.value = ""; } };
</script>"""


async def chat(request: Request) -> Response:
    # Where the app is really served (PORT, a proxy), not a default port that may be wrong.
    return HTMLResponse(CHAT_PAGE.replace("{host}", html.escape(request.url.netloc)))


async def index(request: Request) -> Response:
    base = html.escape(f"{request.url.scheme}://{request.url.netloc}")
    rows = "".join(
        f'<li><a href="/__asynctrace/?run={path}">{path}</a> — {what} '
        f'(<a href="{path}">plain</a>)</li>'
        for path, what in ROUTES.items()
    )
    return HTMLResponse(
        "<!doctype html><meta charset=utf-8><title>asgi-asynctrace sample</title>"
        "<h1>asgi-asynctrace sample</h1><p>Each link runs the route with "
        "<code>X-Async-Trace: 1</code> and opens its trace in the viewer. "
        f"From a terminal: <code>curl -si -H 'X-Async-Trace: 1' {base}/items</code>, or "
        f"<code>asgi-asynctrace trace {base}/slow</code> for the summary of where its time "
        f"went, <code>asgi-asynctrace trace -n 20 {base}/items</code> for the slowest of 20 "
        f"against a typical one, <code>asgi-asynctrace watch {base}</code> for each trace as "
        f"it comes, a line each.</p><ul>{rows}</ul>"
    )


app = Starlette(
    routes=[
        Route("/", index),
        Route("/items", items),
        Route("/sequential", sequential),
        Route("/parallel", parallel),
        Route("/race", race),
        Route("/nested", nested),
        Route("/iteration", iteration),
        Route("/timers", timers),
        Route("/cache", cache),
        Route("/sql", sql),
        Route("/sync", sync_report),
        Route("/stream", stream),
        Route("/slow", slow),
        Route("/chat", chat),
        WebSocketRoute("/ws", room.join),
        Mount("/fastapi", app=api),
    ],
    lifespan=p.lifespan,
)
# SAMPLE_STORE_DIR: a directory the store is shared through, for `uvicorn --workers N`
app.add_middleware(AsyncTraceMiddleware, store_dir=os.environ.get("SAMPLE_STORE_DIR") or None)

__all__ = ["ROUTES", "app"]
