"""Routes that do a little of everything the tracer records.

    uvicorn sample_app.app:app
    curl -si -H 'X-Async-Trace: 1' http://127.0.0.1:8000/items

Embedded defaults only: an in-memory cache and a SQLite file in the system's temp folder.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator

import httpx
from aiocache import SimpleMemoryCache
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from asgi_asynctrace import AsyncTraceMiddleware, annotate, start_resource
from asgi_asynctrace.instrumentation.httpx import TracingTransport  # type: ignore[import-not-found]

DB_PATH = os.environ.get("SAMPLE_DB", os.path.join(tempfile.gettempdir(), "asynctrace-sample.db"))
# aiocache's in-memory backend; the middleware instruments aiocache, so reads and writes show
# up as cache-get / cache-put with their key, hit or miss, and TTL.
cache = SimpleMemoryCache(namespace="sample:")


def _query_items() -> list[dict[str, object]]:
    with sqlite3.connect(DB_PATH) as db:
        db.execute("create table if not exists items (id integer primary key, name text)")
        if not db.execute("select count(*) from items").fetchone()[0]:
            db.executemany("insert into items (name) values (?)", [("apple",), ("pear",)])
        rows = db.execute("select id, name from items order by id").fetchall()
    return [{"id": i, "name": n} for i, n in rows]


async def upstream_price(request: Request) -> Response:
    await asyncio.sleep(0.01)
    return JSONResponse({"price": 1.5})


# A pricing service the app calls over HTTP; served in-process so the sample needs no network.
upstream = Starlette(routes=[Route("/price/{item_id}", upstream_price)])
pricing = httpx.AsyncClient(
    transport=TracingTransport(httpx.ASGITransport(app=upstream)), base_url="http://pricing"
)


async def price(item_id: object) -> float:
    annotate("item", str(item_id))
    response = await pricing.get(f"/price/{item_id}")
    return float(response.json()["price"])


async def items(request: Request) -> Response:
    rows = await cache.get("items")
    if rows is None:
        async with start_resource("db-query", statement="select id, name from items"):
            rows = await asyncio.to_thread(_query_items)
        await cache.set("items", rows, ttl=30)
    assert isinstance(rows, list)
    prices = await asyncio.gather(*(price(row["id"]) for row in rows))
    return JSONResponse({"items": rows, "prices": prices})


async def sequential(request: Request) -> Response:
    await asyncio.sleep(0.02)
    await asyncio.sleep(0.02)
    return JSONResponse({"waited_ms": 40})


def sync_report(request: Request) -> Response:
    time.sleep(0.005)
    annotate("rows", 2)
    return JSONResponse({"ok": True})


async def stream(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(3):
            await asyncio.sleep(0.005)
            yield f"chunk {i}\n".encode()

    return StreamingResponse(chunks(), media_type="text/plain")


async def index(request: Request) -> Response:
    links = "".join(
        f'<li><a href="{p}">{p}</a></li>' for p in ("/items", "/sequential", "/sync", "/stream")
    )
    return HTMLResponse(
        "<h1>asgi-asynctrace sample</h1><p>Send <code>X-Async-Trace: 1</code> to trace a "
        f"request; recent traces: <a href='/__asynctrace/traces'>/__asynctrace/traces</a></p>"
        f"<ul>{links}</ul>"
    )


app = Starlette(
    routes=[
        Route("/", index),
        Route("/items", items),
        Route("/sequential", sequential),
        Route("/sync", sync_report),
        Route("/stream", stream),
    ]
)
app.add_middleware(AsyncTraceMiddleware)
