"""What the SQL instrumentations share: the statement as recorded, rows from a status line.

    normalize("SELECT *\n  FROM t WHERE name = 'ada'")   # "SELECT * FROM t WHERE name = ?"

Exports: normalize, rows_from_status, inside_query.
"""

from __future__ import annotations

import re
from typing import Final

from asgi_asynctrace._context import ACTIVE

__all__ = ["inside_query", "normalize", "rows_from_status"]

_SPACE: Final = re.compile(r"\s+")
# Quoted string literals: they are where values hide when a query is not parameterized.
_LITERAL: Final = re.compile(r"'(?:[^']|'')*'")


def normalize(statement: object) -> str:
    """One line, string literals shown as ``?``; bound parameters are never part of it."""
    text = statement if isinstance(statement, str) else str(statement)
    return _SPACE.sub(" ", _LITERAL.sub("?", text)).strip()


def rows_from_status(status: object) -> int | None:
    """Rows affected from a PostgreSQL command tag such as ``INSERT 0 3`` or ``UPDATE 2``."""
    if isinstance(status, str):
        last = status.rsplit(" ", 1)[-1]
        if last.isdigit():
            return int(last)
    return None


def inside_query() -> bool:
    """True outside a traced request too: then there is nothing to record either.

    A query already being recorded (SQLAlchemy's events, around the driver) is not recorded
    a second time by the driver's own instrumentation.
    """
    active = ACTIVE.get()
    return active is None or active[1].type == "db-query"
