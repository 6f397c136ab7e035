"""SQL as db-query: asyncpg, psycopg and SQLAlchemy on the real PostgreSQL, aiosqlite on
SQLite files."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import aiosqlite
import asyncpg
import psycopg
import pytest
from psycopg import sql
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from asgi_asynctrace import Trace, instrument
from tests.helpers import traced

PG = "postgresql://postgres@127.0.0.1:5432/test"
POSTGRES = pytest.mark.service("postgres")
SECRET = "s3cret-param-value"


@pytest.fixture(autouse=True)
def _sql_on() -> None:
    assert instrument("asyncpg", "aiosqlite", "sqlalchemy", "psycopg") == {
        "asyncpg": True, "aiosqlite": True, "sqlalchemy": True, "psycopg": True}  # fmt: skip


def queries(trace: Trace) -> list[dict[str, Any]]:
    return [trace.annotations_of(r.async_id) | {"state": r.state, "id": r.async_id}
            for r in trace.resources if r.type == "db-query"]  # fmt: skip


def app_line(trace: Trace, rid: int) -> str:
    res = next(r for r in trace.resources if r.async_id == rid)
    assert res.stack_id is not None
    return next(f for f in trace.stacks[res.stack_id] if "tests/instrumentation" in f)


@POSTGRES
def test_asyncpg_queries_with_statement_rows_and_errors_but_never_parameters() -> None:
    table = f"t_{uuid.uuid4().hex[:8]}"

    async def body() -> None:
        conn = await asyncpg.connect(PG)
        try:
            await conn.execute(f"create temp table {table} (id int, name text)")
            await conn.executemany(f"insert into {table} values ($1, $2)",
                                   [(1, SECRET), (2, "b"), (3, "c")])  # fmt: skip
            await conn.execute(f"update {table}   set name = 'x'\n where id > $1", 1)
            rows = await conn.fetch(f"select * from {table} where name <> $1", SECRET)
            assert len(rows) == 2
            assert await conn.fetchrow(f"select * from {table} where id = $1", 99) is None
            with pytest.raises(asyncpg.UndefinedTableError):
                await conn.fetch("select * from no_such_table")
        finally:
            await conn.close()

    trace = traced(body)
    got = queries(trace)
    assert [(q["method"], q.get("rows"), q["state"]) for q in got] == [
        ("execute", None, "ok"),  # CREATE TABLE reports no rows
        ("executemany", None, "ok"),
        ("execute", 2, "ok"),
        ("fetch", 2, "ok"),
        ("fetchrow", 0, "ok"),
        ("fetch", None, "error"),
    ]
    assert got[2]["statement"] == f"update {table} set name = ? where id > $1"
    assert got[-1]["error"] == "UndefinedTableError"
    assert SECRET not in trace.to_json().decode()
    assert "body @ tests/instrumentation/test_sql.py" in app_line(trace, got[3]["id"])


@POSTGRES
def test_psycopg_queries_with_statement_rows_and_errors_but_never_parameters() -> None:
    table = f"t_{uuid.uuid4().hex[:8]}"

    async def body() -> None:
        async with await psycopg.AsyncConnection.connect(PG, autocommit=True) as conn:
            await conn.execute(f"create temp table {table} (id int, name text)")
            async with conn.cursor() as cur:
                await cur.executemany(f"insert into {table} values (%s, %s)",
                                      [(1, SECRET), (2, "b"), (3, "c")])  # fmt: skip
                await cur.execute(f"update {table}   set name = 'x'\n where id > %s", (1,))
                query = sql.SQL("select * from {} where name <> %s").format(sql.Identifier(table))
                await cur.execute(query, (SECRET,))
                assert len(await cur.fetchall()) == 2
            with pytest.raises(psycopg.errors.UndefinedTable):
                await conn.execute("select * from no_such_table")

    trace = traced(body)
    got = queries(trace)
    assert [(q["method"], q.get("rows"), q["state"]) for q in got] == [
        ("execute", None, "ok"),  # CREATE TABLE reports no rows
        ("executemany", 3, "ok"),
        ("execute", 2, "ok"),
        ("execute", 2, "ok"),
        ("execute", None, "error"),
    ]
    assert {q["driver"] for q in got} == {"psycopg"}
    assert got[2]["statement"] == f"update {table} set name = ? where id > %s"
    assert got[3]["statement"] == f'select * from "{table}" where name <> %s'  # as composed
    assert got[-1]["error"] == "UndefinedTable"
    assert SECRET not in trace.to_json().decode()
    assert "body @ tests/instrumentation/test_sql.py" in app_line(trace, got[3]["id"])


def test_aiosqlite_queries_on_a_file(tmp_path: Path) -> None:
    async def body() -> None:
        async with aiosqlite.connect(tmp_path / "app.db") as db:
            await db.execute("create table items (id integer primary key, name text)")
            await db.executemany("insert into items (name) values (?)", [(SECRET,), ("b",)])
            cursor = await db.execute("delete from items where name = ?", ("b",))
            await cursor.close()
            assert len(list(await db.execute_fetchall("select * from items"))) == 1
            with pytest.raises(aiosqlite.OperationalError):
                await db.execute("select * from missing")

    trace = traced(body)
    got = queries(trace)
    assert [(q["method"], q.get("rows"), q["state"]) for q in got] == [
        ("execute", None, "ok"),  # SQLite reports no row count for CREATE
        ("executemany", 2, "ok"),
        ("execute", 1, "ok"),
        ("execute_fetchall", 1, "ok"),
        ("execute", None, "error"),
    ]
    assert got[-1]["error"] == "OperationalError"
    assert SECRET not in trace.to_json().decode()


SA_URLS = [
    pytest.param("postgresql+asyncpg://postgres@127.0.0.1:5432/test", marks=POSTGRES),
    pytest.param("postgresql+psycopg://postgres@127.0.0.1:5432/test", marks=POSTGRES),
    "sqlite+aiosqlite:///{tmp}/sa.db",
]


@pytest.mark.parametrize("url", SA_URLS)
def test_sqlalchemy_records_each_statement_once_whatever_the_driver(
    url: str, tmp_path: Path
) -> None:
    engine = create_async_engine(url.format(tmp=tmp_path))

    async def body() -> None:
        async with engine.begin() as conn:
            await conn.execute(text("create temporary table sa_t (id int, name varchar(20))"))
            rows = [{"i": 1, "n": SECRET}, {"i": 2, "n": "b"}]
            await conn.execute(text("insert into sa_t values (:i, :n)"), rows)
            result = await conn.execute(text("select name from sa_t where id = :i"), {"i": 2})
            assert result.scalar_one() == "b"
        await engine.dispose()

    trace = traced(body)
    got = [q for q in queries(trace) if "sa_t" in q["statement"]]
    assert [q["statement"].split(" ")[0] for q in got] == ["create", "insert", "select"]
    assert {q["driver"] for q in got} == {url.split("+")[1].split(":")[0]}
    # one resource per statement: the driver's own instrumentation stays out
    nested = [
        r
        for r in trace.resources
        if r.type == "db-query"
        and any(p.async_id == r.trigger_id and p.type == "db-query" for p in trace.resources)
    ]
    assert nested == []
    assert SECRET not in trace.to_json().decode()
    assert "body @ tests/instrumentation/test_sql.py" in app_line(trace, got[2]["id"])
