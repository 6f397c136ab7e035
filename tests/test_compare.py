"""compare: two traces side by side, and where the slower one's extra time went."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_asynctrace import (
    AsyncTraceMiddleware,
    analyze,
    capture_traces,
    load_trace,
    start_resource,
)
from asgi_asynctrace._cli import main as main_cli
from asgi_asynctrace._compare import choose_pair, compare
from asgi_asynctrace._model import Trace
from asgi_asynctrace._sinks import LOG_PREFIX
from tests.helpers import run

MS = 1_000_000
QUERY = "select * from lines where order_id = ?"


async def _report(request: Request) -> Response:
    """One fetch, then a query per line, one after another (n-plus-one from three lines)."""
    async with start_resource("fetch", method="GET", url="http://pricing/rates"):
        await asyncio.sleep(0.003)
    for _ in range(request.path_params["lines"]):
        async with start_resource("db-query", statement=QUERY):
            await asyncio.sleep(0.002)
    return PlainTextResponse("report")


def _traces(*lines: int) -> list[Trace]:
    app = AsyncTraceMiddleware(Starlette(routes=[
        Route("/orders/{lines:int}/report", _report),
        Route("/health", lambda request: PlainTextResponse("ok")),
    ]), log_traces=False)  # fmt: skip

    async def main() -> None:
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
            # untraced first: a process's first request pays for what later ones find ready
            assert (await client.get("/orders/1/report")).is_success
            for n in lines:
                path = f"/orders/{n}/report" if n else "/health"
                assert (await client.get(path, headers={"X-Async-Trace": "1"})).is_success

    with capture_traces() as traces:
        run(main())
    return traces


def test_compare_says_where_the_slower_ones_extra_time_went() -> None:
    two, eight = _traces(2, 8)
    result = compare((analyze(two), two), (analyze(eight), eight))
    assert result.route == "GET /orders/{lines}/report" and result.baseline == "faster"
    assert result.delta == eight.duration_ns - two.duration_ns
    # on the critical path, the queries: six more of them, 2 ms each at the least (a few ms
    # left for a busy machine stretching the two)
    first = result.held[0]
    assert first.what == "db-query" and first.delta > 6 * MS
    # the operations: the query six times more (with the sleep inside it, as long), near the
    # top; the fetch the same once in each
    query = next(d for d in result.operations if d.what == f"db-query {QUERY}")
    assert query.count == (2, 8) and query in result.operations[:3]
    fetch = [d for d in result.operations if d.what == "fetch GET http://pricing/rates"]
    assert not fetch or fetch[0].count == (1, 1)  # listed only where its time differed
    # the eight queries are an N+1; the two, after the fetch, are not (they may read as
    # sequential awaits, which the eight, an N+1, do not also report)
    assert result.only_slower == ["n-plus-one"] and "n-plus-one" not in result.only_faster
    doc = result.to_dict()
    assert doc["slower"]["traceId"] == eight.trace_id and doc["baseline"]["traceId"] == two.trace_id
    assert doc["baseline"]["is"] == "faster" and doc["route"] == "GET /orders/{lines}/report"
    rows = {row["what"]: row for row in doc["operations"]}
    assert rows[f"db-query {QUERY}"]["count"] == [2, 8]


def _lasting(trace: Trace, ms: int) -> Trace:
    """``trace`` as if it had taken ``ms`` (the pair is chosen by duration alone: set here, it
    is the test's, not the machine's)."""
    doc = orjson.loads(trace.to_json())
    doc["requestDurationNs"] = ms * MS
    return load_trace(doc)


def test_choose_pair_takes_a_routes_slowest_against_its_median() -> None:
    made = _traces(1, 4, 7, 12, 0)
    traces = [_lasting(t, ms) for t, ms in zip(made, (5, 11, 17, 27, 1), strict=True)]
    by_lines = {t.request["path"]: t for t in traces}
    with pytest.raises(Exception, match=r"5 traces of 2 routes .*narrow them to one route"):
        choose_pair(traces)
    faster, slower, what = choose_pair(traces[:4])
    assert (faster, slower, what) == (by_lines["/orders/4/report"],
                                      by_lines["/orders/12/report"], "typical")  # fmt: skip
    # two are taken as they are, whatever their routes, the faster as the baseline
    faster, slower, what = choose_pair([by_lines["/orders/7/report"], by_lines["/health"]])
    assert (faster.request["path"], slower.request["path"], what) == (
        "/health", "/orders/7/report", "faster")  # fmt: skip
    with pytest.raises(Exception, match="compare needs two traces, or several of one route; got 1"):
        choose_pair(traces[:1])


def test_compare_from_a_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    traces = _traces(2, 2, 30, 0)  # the typical: one of the two of two lines, either
    log = tmp_path / "server.log"
    log.write_bytes(b"".join(b"INFO: " + LOG_PREFIX.encode() + t.to_json() + b"\n"
                             for t in traces))  # fmt: skip
    thirty, two = traces[2], max(traces[:2], key=lambda t: t.duration_ns)
    assert main_cli(["compare", str(log), "--route", "GET /orders/{lines}/report"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith(f"GET /orders/{{lines}}/report: {thirty.duration_ns / MS:.1f} ms "
                               f"(trace {thirty.trace_id[:12]}) against ")  # fmt: skip
    assert f"for the typical one (trace {two.trace_id[:12]}): +" in lines[0]
    assert (
        lines[1] == "  the slower: GET /orders/30/report 200; the typical: GET /orders/2/report 200"
    )
    held = lines[lines.index("") + 2]
    assert held.split()[0] == "db-query" and held.split()[-2].startswith("+")
    ops = out.split("operations (how many, how long alive)")[1].splitlines()
    query = next(line for line in ops[1:4] if line.startswith(f"  db-query {QUERY[:30]}"))
    assert query.endswith("(+28)") and " 2 x " in query and " 30 x " in query
    assert "findings only in the slower: n-plus-one\n" in out  # thirty lines; two are not
    assert main_cli(["compare", str(log), "--id", thirty.trace_id, "--id", two.trace_id,
                     "--json"]) == 0  # fmt: skip
    doc = orjson.loads(capsys.readouterr().out)
    assert (
        doc["slower"]["traceId"] == thirty.trace_id and doc["baseline"]["traceId"] == two.trace_id
    )
    # the whole log has two routes: say how to narrow it
    assert main_cli(["compare", str(log)]) == 2
    err = capsys.readouterr().err
    assert "4 traces of 2 routes (GET /orders/{lines}/report (3), GET /health (1))" in err
    # and routes points at compare for a route with more than two traces
    assert main_cli(["routes", str(log)]) == 0
    route = "'GET /orders/{lines}/report'"
    hint = f"against a typical one: asgi-asynctrace compare {log} --route {route}"
    assert hint in capsys.readouterr().out.splitlines()


async def _item(request: Request) -> Response:
    n = request.path_params["n"]
    async with start_resource("cache-get", op="get", key=f"item:{n}:3f2a9c1e-77b0"):
        await asyncio.sleep(0)
    async with start_resource("fetch", method="GET", url=f"http://10.0.0.7:8080/v1/items/{n}"):
        await asyncio.sleep(0.001 * (n % 10))
    return PlainTextResponse("item")


def test_an_operation_is_one_row_whatever_ids_its_key_or_path_holds() -> None:
    app = AsyncTraceMiddleware(Starlette(routes=[Route("/items/{n:int}", _item)]),
                               log_traces=False)  # fmt: skip

    async def main() -> None:
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
            for n in (41, 48):
                assert (await client.get(f"/items/{n}", headers={"X-Async-Trace": "1"})).is_success

    with capture_traces() as traces:
        run(main())
    fast, slow = traces
    result = compare((analyze(fast), fast), (analyze(slow), slow))
    rows = {d.what: d.count for d in result.operations}
    # the fetch took longer (1 ms against 8): one row, counted once on each side
    assert rows["fetch GET http://10.0.0.7:8080/v1/items/{id}"] == (1, 1)
    # the cache key's ids are ids too; its time may or may not differ, never its count
    assert rows.get("cache-get get item:{id}:{id}", (1, 1)) == (1, 1)
    keyed = [w for w in rows if w.startswith(("fetch", "cache-"))]
    assert not [w for w in keyed if rows[w][0] != rows[w][1]], rows
    # (a timer is named by its delay: a sleep of 1 ms and one of 8 ms are two rows, rightly)
    assert rows["timer sleep 8.0ms"] == (0, 1) and rows["timer sleep 1.0ms"] == (1, 0)
