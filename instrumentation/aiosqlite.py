"""aiosqlite queries as ``db-query`` resources.

    asgi_asynctrace.instrument("aiosqlite")   # the middleware does this by default

``Connection.execute``, ``executemany``, ``executescript``, ``execute_fetchall`` and
``execute_insert`` (still usable as ``async with``) and the same methods of ``Cursor`` each
record one resource: ``statement`` (one line, string literals as ``?``; parameters never), ``rows``
affected when SQLite reports it, ``error`` on failure. Queries run by SQLAlchemy over aiosqlite
are recorded by the ``sqlalchemy`` instrumentation, once. Supports aiosqlite >= 0.17.
Exports: AiosqliteInstrumentation, instrumentation.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from asgi_asynctrace import start_resource

from ._base import Instrumentation
from ._patch import untraced_fast_path
from ._sql import inside_query, normalize

__all__ = ["AiosqliteInstrumentation", "instrumentation"]


def _wrap(method: str, original: Callable[..., Any]) -> Callable[..., Any]:
    async def query(self: Any, statement: Any, *args: Any, **kwargs: Any) -> Any:
        if inside_query():
            return await original(self, statement, *args, **kwargs)
        with start_resource("db-query", statement=normalize(statement), driver="aiosqlite",
                            method=method) as scope:  # fmt: skip
            result = await original(self, statement, *args, **kwargs)
            if method == "execute_fetchall":
                scope.annotate("rows", len(result))
            else:
                rowcount = getattr(result, "rowcount", -1)  # a Cursor for execute*
                if isinstance(rowcount, int) and rowcount >= 0:
                    scope.annotate("rows", rowcount)
            return result

    return untraced_fast_path(original, query)  # type: ignore[no-any-return]


_CONNECTION_METHODS = (
    "execute", "executemany", "executescript", "execute_fetchall", "execute_insert",
)  # fmt: skip


class AiosqliteInstrumentation(Instrumentation):
    name = "aiosqlite"
    library = "aiosqlite"
    supported = (0, 17)

    def _install(self, module: ModuleType) -> None:
        from aiosqlite.context import contextmanager

        cursor, connection = module.Cursor, module.Connection
        for method in ("execute", "executemany", "executescript"):
            self.patches.replace(cursor, method, _wrap(method, getattr(cursor, method)))
        for method in _CONNECTION_METHODS:
            original = getattr(connection, method)
            # aiosqlite returns a Result (awaitable and an async context manager) made from
            # the coroutine function it wraps: wrap that function, and make a Result again.
            inner = getattr(original, "__wrapped__", None)
            replacement = (
                contextmanager(_wrap(method, inner))
                if inner is not None
                else _wrap(method, original)
            )
            self.patches.replace(connection, method, replacement)


instrumentation = AiosqliteInstrumentation()
