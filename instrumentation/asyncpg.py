"""asyncpg queries as ``db-query`` resources.

    asgi_asynctrace.instrument("asyncpg")     # the middleware does this by default

``Connection.execute``, ``executemany``, ``fetch``, ``fetchrow`` and ``fetchval`` (so a pool's
methods of the same names too) each record one resource: ``statement`` (one line, string
literals as ``?``; bound parameters never), ``rows`` returned or affected where asyncpg tells,
``error`` on failure. asyncpg's query logger reports only after a query ends and without row
counts, so the methods are wrapped instead. Queries run by SQLAlchemy over asyncpg are
recorded by the ``sqlalchemy`` instrumentation, once. Supports asyncpg >= 0.27.
Exports: AsyncpgInstrumentation, instrumentation.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from asgi_asynctrace._context import record_call
from asgi_asynctrace._failures import report

from ._base import Instrumentation
from ._patch import untraced_fast_path
from ._sql import inside_query, normalize, rows_from_status

__all__ = ["AsyncpgInstrumentation", "instrumentation"]


def _rows(method: str, result: Any) -> int | None:
    if method == "fetch":
        return len(result)
    if method == "fetchrow":
        return 0 if result is None else 1
    if method == "execute":
        return rows_from_status(result)
    return None


def _wrap(method: str, original: Callable[..., Any]) -> Callable[..., Any]:
    def done(result: Any) -> dict[str, Any] | None:
        rows = _rows(method, result)
        return {"rows": rows} if rows is not None else None

    def query(self: Any, statement: Any, *args: Any, **kwargs: Any) -> Any:
        call = original(self, statement, *args, **kwargs)  # asyncpg's own coroutine
        if inside_query():
            return call
        try:
            notes = {"statement": normalize(statement), "driver": "asyncpg", "method": method}
        except Exception as exc:
            report("asyncpg", exc)
            return call
        return record_call("db-query", call, notes, done)

    return untraced_fast_path(original, query)  # type: ignore[no-any-return]


class AsyncpgInstrumentation(Instrumentation):
    name = "asyncpg"
    library = "asyncpg"
    supported = (0, 27)

    def _install(self, module: ModuleType) -> None:
        from asyncpg.connection import Connection

        for method in ("execute", "executemany", "fetch", "fetchrow", "fetchval"):
            self.patches.replace(Connection, method, _wrap(method, getattr(Connection, method)))


instrumentation = AsyncpgInstrumentation()
