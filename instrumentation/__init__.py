"""Instrumentation of libraries an app talks to; installed as ``asgi_asynctrace.instrumentation``.

    from asgi_asynctrace.instrumentation import available
    available()        # names of the instrumentation modules shipped in this version

The source lives in the project's top-level ``instrumentation/`` folder: timers, httpx,
aiohttp, aiocache, cashews, redis, asyncpg, psycopg, aiosqlite, sqlalchemy and aio_pika, all
of one shape (``_base.Instrumentation``); each records through
``asgi_asynctrace.start_resource`` or, for an awaited call, ``_context.record_call`` (the same
machinery, with no coroutine frame of its own), so a user can instrument their own client the
same way.
"""

from __future__ import annotations

import pkgutil

__all__ = ["available"]


def available() -> list[str]:
    """Names of the instrumentation modules in this installation."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
