"""Shared helpers: run a coroutine on the loop under test, and call ASGI apps in-process.

Set ASYNCTRACE_TEST_LOOP=uvloop to run the whole suite on uvloop instead of asyncio's loop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import httpx

T = TypeVar("T")
LOOP = os.environ.get("ASYNCTRACE_TEST_LOOP", "asyncio")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion on a fresh loop of the kind under test."""
    if LOOP == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


def client(app: Any, client_host: str = "127.0.0.1") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(client_host, 50123))
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


def call(app: Any, fn: Callable[[httpx.AsyncClient], Awaitable[T]], host: str = "127.0.0.1") -> T:
    """Run ``fn(client)`` against ``app`` in-process and return what it returns."""

    async def main() -> T:
        async with client(app, host) as c:
            return await fn(c)

    return run(main())
