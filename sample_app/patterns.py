"""The async patterns the sample app shows, as plain coroutines both of its apps call.

    rows = await load_items()               # cache, then SQL on a miss, then cache again
    prices = await prices_in_parallel(rows)

Embedded defaults: aiocache's memory backend and SQLite through SQLAlchemy's async engine, in
the system's temp folder. Set SAMPLE_REDIS_URL (redis://host:port) and SAMPLE_DATABASE_URL
(postgresql+asyncpg://user@host/db) to use Redis and PostgreSQL instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlparse

import httpx
from aiocache import BaseCache, SimpleMemoryCache
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from asgi_asynctrace import annotate
from asgi_asynctrace.instrumentation.httpx import TracingTransport  # type: ignore[import-not-found]

DB_PATH = os.environ.get("SAMPLE_DB", os.path.join(tempfile.gettempdir(), "asynctrace-sample.db"))
DATABASE_URL = os.environ.get("SAMPLE_DATABASE_URL", f"sqlite+aiosqlite:///{DB_PATH}")
REDIS_URL = os.environ.get("SAMPLE_REDIS_URL")


def _cache() -> BaseCache:
    if REDIS_URL:
        from aiocache import RedisCache

        where = urlparse(REDIS_URL)
        return RedisCache(endpoint=where.hostname or "127.0.0.1", port=where.port or 6379,
                          namespace="sample:")  # fmt: skip
    return SimpleMemoryCache(namespace="sample:")


cache = _cache()
_engine: AsyncEngine | None = None


def engine() -> AsyncEngine:
    global _engine
    if _engine is None:
        _engine = create_async_engine(DATABASE_URL)
    return _engine


_schema_ready = False
SEED = [{"id": 1, "name": "apple"}, {"id": 2, "name": "pear"}, {"id": 3, "name": "plum"}]


async def _ensure_schema() -> None:
    global _schema_ready
    if _schema_ready:
        return
    async with engine().begin() as conn:
        await conn.execute(
            text("create table if not exists items (id integer primary key, name text)")
        )
        # concurrent first requests may both get here: the second insert does nothing
        insert = "insert into items (id, name) values (:id, :name) on conflict do nothing"
        await conn.execute(text(insert), SEED)
    _schema_ready = True


async def upstream_price(request: Request) -> Response:
    """The pricing service the app calls: a little latency, as over a network."""
    await asyncio.sleep(float(request.query_params.get("ms", "10")) / 1000)
    return JSONResponse({"item": request.path_params["item_id"], "price": 1.5})


# Served in-process, so the sample needs no network; every call is a recorded fetch.
upstream = Starlette(routes=[Route("/price/{item_id}", upstream_price)])
pricing = httpx.AsyncClient(
    transport=TracingTransport(httpx.ASGITransport(app=upstream)), base_url="http://pricing"
)


async def price(item_id: object, ms: int = 10) -> float:
    annotate("item", str(item_id))
    response = await pricing.get(f"/price/{item_id}", params={"ms": ms})
    return float(response.json()["price"])


async def query_items() -> list[dict[str, Any]]:
    await _ensure_schema()
    async with engine().connect() as conn:
        rows = await conn.execute(text("select id, name from items order by id"))
        return [{"id": i, "name": n} for i, n in rows]


async def load_item(item_id: int) -> dict[str, Any] | None:
    """One row, by its id."""
    await _ensure_schema()
    async with engine().connect() as conn:
        found = await conn.execute(text("select id, name from items where id = :id"),
                                   {"id": item_id})  # fmt: skip
        row = found.first()
        return None if row is None else {"id": row[0], "name": row[1]}


async def load_items() -> list[dict[str, Any]]:
    """Cache-aside: a hit is one cache-get; a miss adds the query and a cache-put."""
    rows = await cache.get("items")
    if rows is None:
        rows = await query_items()
        await cache.set("items", rows, ttl=30)
    return list(rows)


async def prices_in_parallel(rows: list[dict[str, Any]]) -> list[float]:
    return list(await asyncio.gather(*(price(row["id"]) for row in rows)))


async def prices_one_by_one(rows: list[dict[str, Any]]) -> list[float]:
    return [await price(row["id"]) for row in rows]  # the planted problem of /sequential


async def race() -> dict[str, Any]:
    fast = asyncio.create_task(price("fast", ms=5))
    slow = asyncio.create_task(price("slow", ms=50))
    done, pending = await asyncio.wait({fast, slow}, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    firsts = []
    for next_done in asyncio.as_completed([price("a", ms=8), price("b", ms=4)]):
        firsts.append(await next_done)
    return {"winner": "fast" if fast in done else "slow", "as_completed": len(firsts)}


async def nested(depth: int = 3) -> int:
    if depth == 0:
        await asyncio.sleep(0.002)
        return 0
    return 1 + await asyncio.create_task(nested(depth - 1))


async def ticks(n: int) -> AsyncIterator[int]:
    for i in range(n):
        await asyncio.sleep(0.002)
        yield i


async def timers() -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    fired = loop.create_future()
    loop.call_later(0.005, fired.set_result, "rang")
    timed_out = False
    try:
        await asyncio.wait_for(asyncio.sleep(1), timeout=0.01)
    except asyncio.TimeoutError:
        timed_out = True
    await asyncio.sleep(0.003)
    return {"call_later": await fired, "wait_for_timed_out": timed_out}


async def cache_hit_and_miss() -> dict[str, Any]:
    key = f"visits:{time.monotonic_ns()}"
    miss = await cache.get(key)
    await cache.set(key, 1, ttl=5)
    hit = await cache.get(key)
    await cache.delete(key)
    return {"miss": miss, "hit": hit}


def report_rows() -> int:
    """A sync endpoint's work: runs in the thread pool."""
    time.sleep(0.005)
    annotate("rows", 2)
    return 2


# The item of each line of an order that /slow reports on.
ORDER_LINES = [1 + line % 3 for line in range(20)]


async def discount_applies() -> bool:
    return await price("discount") > 0  # reads the discount to decide


async def slow_report() -> dict[str, Any]:
    """The planted problems for the analyzer: the discount fetched twice (once to decide, once
    to apply it), a query per order line (an N+1 big enough to cost milliseconds on any
    machine), and a blocking call."""
    discount = await price("discount") if await discount_applies() else 0.0  # a second read
    names = []
    for item_id in ORDER_LINES:
        async with engine().connect() as conn:
            result = await conn.execute(text("select name from items where id = :id"),
                                        {"id": item_id})  # fmt: skip
            names.append(result.scalar_one_or_none())
    time.sleep(0.03)  # a blocking call on the event loop: every other request waits
    return {"names": names, "discount": discount}


@contextlib.asynccontextmanager
async def lifespan(app: Any) -> AsyncIterator[None]:
    await _ensure_schema()
    yield
    await pricing.aclose()
    if _engine is not None:
        await _engine.dispose()
