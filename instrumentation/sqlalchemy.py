"""SQLAlchemy statements as ``db-query`` resources, for every engine and driver.

    asgi_asynctrace.instrument("sqlalchemy")  # the middleware does this by default

SQLAlchemy's own cursor events (``before_cursor_execute``, ``after_cursor_execute``,
``handle_error``) are listened to on the ``Engine`` class, so every engine — the async engine's
too, whatever driver is under it (asyncpg, aiosqlite, psycopg, aiomysql, ...) — records one
resource per statement sent: ``statement`` (one line, string literals as ``?``; parameters
never), ``driver``, ``rows`` when the cursor knows, ``error``. The async engine runs the driver
inside a greenlet, whose frames stop at SQLAlchemy; the stack is completed with the frames of
the task that awaited the query, so it still leads to the app's line. The driver's own
instrumentation sees the query is recorded and stays out. Supports SQLAlchemy >= 2.0.
Exports: SqlalchemyInstrumentation, instrumentation.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

from asgi_asynctrace._context import ACTIVE, ResourceScope
from asgi_asynctrace._failures import report
from asgi_asynctrace._stacks import frames_from

from ._base import Instrumentation
from ._sql import normalize

__all__ = ["SqlalchemyInstrumentation", "instrumentation"]

_ATTR = "_asynctrace_scope"


def _awaiting_frames(limit: int) -> tuple[str, ...]:
    """The frames of the greenlet that spawned this one, where the app awaited the query.

    SQLAlchemy runs the driver in a child greenlet of the one running the event loop; that
    parent is suspended inside ``greenlet_spawn``, below the awaiting task's coroutines.
    """
    try:
        import greenlet
    except ImportError:
        return ()
    parent = greenlet.getcurrent().parent
    return frames_from(getattr(parent, "gr_frame", None), limit)


def _in_greenlet_stack(limit: int) -> tuple[str, ...]:
    return frames_from(sys._getframe(2), limit)


def _before(conn: Any, cursor: Any, statement: Any, parameters: Any, context: Any,
            executemany: bool) -> None:  # fmt: skip
    active = ACTIVE.get()
    if active is None or context is None:
        return
    trace = active[0]
    try:
        scope = ResourceScope("db-query", statement=normalize(statement),
                              driver=str(conn.dialect.driver))  # fmt: skip
        scope.__enter__()
        res = scope.resource
        if res is not None and trace.stack_depth:
            # SQLAlchemy's own frames, then the awaiting task's: the app's line is there
            depth = trace.stack_depth
            frames = (_in_greenlet_stack(depth // 2) + _awaiting_frames(depth))[:depth]
            res.stack_id = trace.stack_id(frames, frames)
        setattr(context, _ATTR, scope)
    except Exception as exc:
        report("sqlalchemy", exc)


def _after(conn: Any, cursor: Any, statement: Any, parameters: Any, context: Any,
           executemany: bool) -> None:  # fmt: skip
    scope: ResourceScope | None = getattr(context, _ATTR, None)
    if scope is None:
        return
    try:
        delattr(context, _ATTR)
        rowcount = getattr(cursor, "rowcount", -1)
        if isinstance(rowcount, int) and rowcount >= 0:
            scope.annotate("rows", rowcount)
        scope.__exit__(None, None, None)
    except Exception as exc:
        report("sqlalchemy", exc)


def _error(exception_context: Any) -> None:
    context = getattr(exception_context, "execution_context", None)
    scope: ResourceScope | None = getattr(context, _ATTR, None)
    if scope is None:
        return
    try:
        delattr(context, _ATTR)
        error = exception_context.original_exception
        scope.__exit__(type(error), error, None)
    except Exception as exc:
        report("sqlalchemy", exc)


_LISTENERS = (
    ("before_cursor_execute", _before),
    ("after_cursor_execute", _after),
    ("handle_error", _error),
)


class SqlalchemyInstrumentation(Instrumentation):
    name = "sqlalchemy"
    library = "sqlalchemy"
    supported = (2, 0)

    def _install(self, module: ModuleType) -> None:
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        for name, fn in _LISTENERS:
            event.listen(Engine, name, fn)

    def uninstall(self) -> None:
        if self.installed:
            from sqlalchemy import event
            from sqlalchemy.engine import Engine

            for name, fn in _LISTENERS:
                if event.contains(Engine, name, fn):
                    event.remove(Engine, name, fn)
        super().uninstall()


instrumentation = SqlalchemyInstrumentation()
