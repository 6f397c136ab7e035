"""psycopg 3 queries (its asyncio side) as ``db-query`` resources.

    asgi_asynctrace.instrument("psycopg")     # the middleware does this by default

``AsyncCursor.execute`` and ``executemany`` (so ``AsyncConnection.execute``, which runs a
cursor's, too) each record one resource: ``statement`` (one line, string literals as ``?``;
bound parameters never; a ``psycopg.sql`` composition as the connection renders it),
``rows`` returned or affected where psycopg tells (``rowcount``), ``error`` on failure.
psycopg has no hook that sees a query start and end, so the methods are wrapped. Queries run
by SQLAlchemy over psycopg are recorded by the ``sqlalchemy`` instrumentation, once. Server
cursors (``AsyncServerCursor``) and the synchronous ``Connection`` are left alone (a sync call
in the thread pool is recorded as its ``thread``). Supports psycopg >= 3.1.
Exports: PsycopgInstrumentation, instrumentation.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from asgi_asynctrace._context import record_call
from asgi_asynctrace._failures import report

from ._base import Instrumentation
from ._patch import untraced_fast_path
from ._sql import inside_query, normalize

__all__ = ["PsycopgInstrumentation", "instrumentation"]


def _statement(cursor: Any, query: Any) -> str:
    """The query as text: a composition (``psycopg.sql.SQL``, ``Composed``) as rendered."""
    if isinstance(query, bytes):
        return normalize(query.decode("utf-8", "replace"))
    if not isinstance(query, str) and hasattr(query, "as_string"):
        return normalize(query.as_string(cursor.connection))
    return normalize(query)


def _rows(cursor: Any) -> dict[str, Any] | None:
    """Rows returned or affected, as the cursor counts them (``executemany`` returns None)."""
    rows = getattr(cursor, "rowcount", -1)
    return {"rows": rows} if isinstance(rows, int) and rows >= 0 else None


def _wrap(method: str, original: Callable[..., Any]) -> Callable[..., Any]:
    def query(self: Any, statement: Any, *args: Any, **kwargs: Any) -> Any:
        call = original(self, statement, *args, **kwargs)  # psycopg's own coroutine
        if inside_query():
            return call
        try:
            notes = {"statement": _statement(self, statement), "driver": "psycopg",
                     "method": method}  # fmt: skip
        except Exception as exc:
            report("psycopg", exc)
            return call
        return record_call("db-query", call, notes, lambda _result: _rows(self))

    return untraced_fast_path(original, query)  # type: ignore[no-any-return]


class PsycopgInstrumentation(Instrumentation):
    name = "psycopg"
    library = "psycopg"
    supported = (3, 1)

    def _install(self, module: ModuleType) -> None:
        cursor = module.AsyncCursor
        for method in ("execute", "executemany"):
            self.patches.replace(cursor, method, _wrap(method, getattr(cursor, method)))


instrumentation = PsycopgInstrumentation()
