"""Many traces by route: the route's template recorded, what held each route up, the CLI."""

from __future__ import annotations

import asyncio
import io
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route

from asgi_asynctrace import AsyncTraceMiddleware, analyze, capture_traces, start_resource
from asgi_asynctrace._analysis import Analysis, PathStep
from asgi_asynctrace._cli import main as main_cli
from asgi_asynctrace._findings import Finding
from asgi_asynctrace._request import route_of
from asgi_asynctrace._routes import OWN_CODE, REST, by_route, held_up_by, own_steps
from asgi_asynctrace._sinks import LOG_PREFIX, decode_trace_header
from tests.helpers import run

MS = 1_000_000


@pytest.mark.parametrize(
    ("path", "params", "route"),
    [
        ("/orders/42/lines", {"order_id": 42}, "/orders/{order_id}/lines"),
        ("/items/items", {"name": "items"}, "/items/{name}"),  # the value is also a literal
        ("/u/1/v/1", {"a": 1, "b": 1}, "/u/{a}/v/{b}"),  # two parameters, one value
        ("/a/4242/42", {"x": 42}, "/a/4242/{x}"),  # whole segments only
        ("/files/docs/a.txt", {"p": "docs/a.txt"}, "/files/{p}"),  # a path parameter
        ("/items", {}, None),  # nothing matched: the path is the route
        ("/x/42", {"x": "4"}, None),  # not a whole segment anywhere
    ],
)
def test_route_of_puts_the_parameters_back_in_the_path(
    path: str, params: dict[str, Any], route: str | None
) -> None:
    assert route_of({"path": path, "path_params": params}) == route


async def _order(request: Request) -> Response:
    await asyncio.sleep(0)
    return PlainTextResponse(f"order {request.path_params['order_id']}")


def _shop_app() -> Any:
    inner = [Route("/items/{name}", _order_item)]
    return Starlette(routes=[
        Route("/orders/{order_id:int}/lines", _order),
        Route("/health", _order_free),
        Mount("/shops/{shop}", routes=inner),
    ])  # fmt: skip


async def _order_item(request: Request) -> Response:
    return PlainTextResponse(request.path_params["name"])


async def _order_free(request: Request) -> Response:
    return PlainTextResponse("ok")


def test_the_middleware_records_the_route_a_request_matched() -> None:
    app = AsyncTraceMiddleware(_shop_app(), log_traces=False)

    inline = []

    async def main() -> None:
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
            for path in ("/orders/42/lines", "/orders/7/lines", "/shops/north/items/tea",
                         "/health"):  # fmt: skip
                response = await client.get(path, headers={"X-Async-Trace": "1"})
                assert response.status_code == 200
                inline.append(decode_trace_header(response.headers["x-async-trace-data"]))

    with capture_traces() as traces:
        run(main())
    got = [(t.request["path"], t.annotations_of(t.root.async_id).get("route")) for t in traces]
    assert got == [
        ("/orders/42/lines", "/orders/{order_id}/lines"),
        ("/orders/7/lines", "/orders/{order_id}/lines"),
        ("/shops/north/items/tea", "/shops/{shop}/items/{name}"),  # a mount's parameter too
        ("/health", None),
    ]
    # the trace in the response header, taken as the response started, names it too (once)
    notes = [[a["value"] for a in doc["annotations"] if a["key"] == "route"] for doc in inline]
    assert notes == [["/orders/{order_id}/lines"], ["/orders/{order_id}/lines"],
                     ["/shops/{shop}/items/{name}"], []]  # fmt: skip
    assert [a for _, a, _ in traces[0].annotations].count("route") == 1
    # and they come out in the JSON, for the routes command to group by
    assert b'"key":"route","value":"/orders/{order_id}/lines"' in traces[0].to_json()


def _analysis(duration: int, path: list[PathStep], findings: list[Finding] = ()) -> Analysis:  # type: ignore[assignment]
    return Analysis("t" * 32, {"method": "GET", "path": "/x"}, duration, {}, {}, path,
                    list(findings))  # fmt: skip


def step(rid: int, type: str, start_ms: float, end_ms: float, depth: int = 0) -> PathStep:
    return PathStep(rid, type, type, int(start_ms * MS), int(end_ms * MS), depth)


def test_held_up_by_gives_a_tasks_time_to_what_it_waited_on_inside() -> None:
    a = _analysis(30 * MS, [
        step(1, "root", 0, 2),                 # own code
        step(2, "task", 2, 12),                # a task: 6 ms of it a fetch, inside it a
        step(3, "fetch", 3, 9, depth=1),       # timer, deeper, which the fetch waited on
        step(4, "timer", 4, 8, depth=2),
        step(5, "db-query", 12, 20),           # an operation, straight
        step(6, "task", 20, 26),               # two queries side by side in a task: they
        step(7, "db-query", 20, 24, depth=1),  # overlap, and share the 5 ms they cover
        step(8, "cache-get", 21, 25, depth=1),
        step(9, "task", 26, 28),               # a task with nothing inside: its own
    ])  # fmt: skip
    held = held_up_by(a)
    assert held == {
        OWN_CODE: 2 * MS, "fetch": 6 * MS, "task": 4 * MS + 1 * MS + 2 * MS,
        "db-query": 8 * MS + 2.5 * MS, "cache-get": 2.5 * MS,
        REST: 2 * MS,  # 28 to 30 ms: not on the path
    }  # fmt: skip
    assert sum(held.values()) == a.duration
    # where the root's own steps ran off the path (between queries, say), that is its own code
    # too: 29 to 30 ms here; a step inside a listed stretch is not counted twice (1 to 3 ms)
    held = held_up_by(a, [(1 * MS, 3 * MS), (29 * MS, 30 * MS)])
    assert (held[OWN_CODE], held[REST]) == (2 * MS + 1 * MS, 1 * MS)
    assert sum(held.values()) == a.duration


def _finding(kind: str, severity: str) -> Finding:
    return Finding(kind, kind, MS, (1,), "fix it", severity)


def test_by_route_groups_by_template_and_ranks_the_slowest_first() -> None:
    def one(duration_ms: int, route: str | None, path: str, *found: Finding) -> Any:
        a = _analysis(duration_ms * MS, [step(1, "root", 0, duration_ms)], list(found))
        a.request = {"method": "GET", "path": path}
        a.trace_id = f"{duration_ms:032d}"
        return a, ({"route": route} if route else {}), ()

    routes = by_route([
        one(10, "/orders/{id}", "/orders/1"),
        one(50, "/orders/{id}", "/orders/2", _finding("n-plus-one", "medium")),
        one(30, "/orders/{id}", "/orders/3", _finding("n-plus-one", "high"),
            _finding("n-plus-one", "low"), _finding("blocked-loop", "high")),
        one(20, None, "/health"),
    ])  # fmt: skip
    assert [(r.method, r.route, r.count) for r in routes] == [
        ("GET", "/orders/{id}", 3), ("GET", "/health", 1),
    ]  # fmt: skip
    orders = routes[0]
    assert (orders.percentile(50), orders.percentile(95), max(orders.durations)) == (
        30 * MS, 50 * MS, 50 * MS,
    )  # fmt: skip
    # each kind counted once per trace that had it, with the worst severity seen
    assert orders.findings == {"n-plus-one": 2, "blocked-loop": 1}
    assert orders.worst == {"n-plus-one": "high", "blocked-loop": "high"}
    assert orders.slowest == (50 * MS, f"{50:032d}")
    doc = orders.to_dict()
    assert doc["heldUpBy"] == {OWN_CODE: 1.0} and doc["traces"] == 3


async def _report(request: Request) -> Response:
    for _ in range(4):  # a query per line, one after another: n-plus-one
        async with start_resource("db-query", statement="select * from lines where id = ?"):
            await asyncio.sleep(0.002)
    if request.path_params["order_id"] == 2:
        time.sleep(0.03)  # and, for one order, a blocking call: blocked-loop
    return PlainTextResponse("report")


def test_routes_over_traces_from_a_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    app = AsyncTraceMiddleware(Starlette(routes=[
        Route("/orders/{order_id:int}/report", _report),
        Route("/health", _order_free),
    ]), log_traces=False)  # fmt: skip

    async def main() -> None:
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
            for path in ("/orders/1/report", "/orders/2/report", "/orders/3/report", "/health"):
                assert (await client.get(path, headers={"X-Async-Trace": "1"})).is_success

    with capture_traces() as traces:
        run(main())
    log = tmp_path / "server.log"
    log.write_bytes(b"".join(b"INFO: " + LOG_PREFIX.encode() + t.to_json() + b"\n"
                             for t in traces))  # fmt: skip
    assert main_cli(["routes", str(log)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("4 trace(s), 2 route(s), the slowest (95th percentile) first\n")
    blocks = out.split("\n\n")[1:]
    orders = blocks[0]
    assert orders.startswith("GET /orders/{order_id}/report  (3 traces)\n")
    shares = orders.split("held up by   ")[1].split("\n")[0]
    # the queries and the blocking call's 30 ms of own code (the sleeps inside the queries
    # are the queries' time: a resource of the app's own is an operation, not a carrier)
    assert shares.startswith(("own code ", "db-query ")) and "db-query " in shares, shares
    assert "n-plus-one in 3 (" in orders and "blocked-loop in 1 (high)" in orders
    slowest = max(traces[:3], key=lambda t: t.duration_ns)
    assert f"  slowest      {slowest.trace_id}  " in orders
    assert blocks[1].startswith("GET /health  (1 trace)\n") and "findings     none" in blocks[1]
    # and the next step, ready to paste: the slowest route's slowest trace from the same log
    hint = f"asgi-asynctrace summary {log} --id {slowest.trace_id[:12]}"
    assert out.splitlines()[-2].startswith(f"the slowest route's slowest trace: {hint}")
    assert out.splitlines()[-1] == (f"against a typical one: asgi-asynctrace compare {log} "
                                    "--route 'GET /orders/{order_id}/report'")  # fmt: skip
    assert main_cli(hint.split()[1:]) == 0
    assert capsys.readouterr().out.startswith(f"GET {slowest.request['path']} 200 ")
    assert main_cli(["routes", "--json", str(log)]) == 0
    docs = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(d["route"], d["traces"]) for d in docs] == [("/orders/{order_id}/report", 3),
                                                          ("/health", 1)]  # fmt: skip
    assert docs[0]["findings"]["blocked-loop"] == {"traces": 1, "worst": "high"}
    for doc in docs:
        assert abs(sum(doc["heldUpBy"].values()) - 1) < 0.01
    for trace in traces:  # each trace's duration, all accounted for
        held = held_up_by(analyze(trace), own_steps(trace))
        assert sum(held.values()) == pytest.approx(trace.duration_ns, abs=10)


def test_commands_read_only_the_traces_asked_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app = AsyncTraceMiddleware(_shop_app(), log_traces=False)
    paths = ["/orders/1/lines", "/health", "/orders/22/lines", "/shops/north/items/tea",
             "/orders/333/lines"]  # fmt: skip

    async def main() -> None:
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
            for path in paths:
                assert (await client.get(path, headers={"X-Async-Trace": "1"})).is_success
            response = await client.post("/health", headers={"X-Async-Trace": "1"})
            assert response.status_code == 405

    with capture_traces() as traces:
        run(main())
    log = tmp_path / "server.log"
    log.write_bytes(b"".join(b"INFO: " + LOG_PREFIX.encode() + t.to_json() + b"\n"
                             for t in traces))  # fmt: skip

    def summarised(*options: str) -> list[str]:
        assert main_cli(["summary", str(log), "--json", *options]) == 0
        docs = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
        return [f"{d['request']['method']} {d['request']['path']}" for d in docs]

    assert len(summarised()) == 6  # nothing asked: every trace
    # a route by its template, with or without the method, or by a path it served
    lines = ["GET /orders/1/lines", "GET /orders/22/lines", "GET /orders/333/lines"]
    assert summarised("--route", "GET /orders/{order_id}/lines") == lines
    assert summarised("--route", "/orders/{order_id}/lines") == lines
    assert summarised("--route", "/orders/22/lines") == ["GET /orders/22/lines"]
    assert summarised("--route", "/health") == ["GET /health", "POST /health"]
    assert summarised("--route", "POST  /health") == ["POST /health"]  # spaces as typed
    assert summarised("--route", "/health", "--route", "/shops/{shop}/items/{name}") == [
        "GET /health", "GET /shops/north/items/tea", "POST /health"]  # fmt: skip
    # by id: the whole id, or its start, in either case
    third = traces[2].trace_id
    assert summarised("--id", third) == ["GET /orders/22/lines"]
    assert summarised("--id", third[:8].upper()) == ["GET /orders/22/lines"]
    # the slowest, the longest first; and only the slow ones
    by_length = sorted(traces, key=lambda t: -t.duration_ns)
    want = [f"{t.request['method']} {t.request['path']}" for t in by_length[:2]]
    assert summarised("--slowest", "2") == want
    floor = by_length[2].duration_ns / 1e6
    assert summarised("--min-ms", f"{floor:.6f}") == [
        f"{t.request['method']} {t.request['path']}" for t in traces
        if t.duration_ns >= round(floor * 1e6)]  # fmt: skip
    # by when they started: a time (with its zone, or local), or how long ago
    from datetime import datetime, timezone

    starts = [t.started_at_unix_ns for t in traces]
    assert starts == sorted(starts) and starts[2] - starts[1] > 100_000  # 0.1 ms apart at least
    between = datetime.fromtimestamp((starts[1] + starts[2]) / 2e9, tz=timezone.utc).isoformat()
    everyone = [f"{t.request['method']} {t.request['path']}" for t in traces]
    assert summarised("--since", between) == everyone[2:]
    assert summarised("--until", between) == everyone[:2]
    local = datetime.fromtimestamp((starts[1] + starts[2]) / 2e9).isoformat()  # no zone: local
    assert summarised("--since", local) == everyone[2:]
    assert summarised("--since", "1h") == everyone
    assert main_cli(["summary", str(log), "--since", "0s"]) == 2  # from now on: none yet
    assert "no trace matched --since " in capsys.readouterr().err
    assert main_cli(["summary", str(log), "--until", "last week"]) == 2
    assert "--until wants a time (2026-12-01T10:00" in capsys.readouterr().err
    # every command that reads traces takes them
    out = tmp_path / "one.jsonl"
    assert main_cli(["convert", str(log), "--to", "json", "--id", third, "-o", str(out)]) == 0
    assert [orjson.loads(line)["traceId"] for line in out.read_bytes().splitlines()] == [third]
    assert main_cli(["routes", str(log), "--route", "/health"]) == 0
    assert capsys.readouterr().out.startswith("2 trace(s), 2 route(s)")
    assert main_cli(["diagnose", str(log), "--slowest", "1"]) == 0
    assert capsys.readouterr().out.count(" finding(s)") == 1
    # nothing matched, or a bad option: said, and exit status 2
    assert main_cli(["summary", str(log), "--id", "zz", "--route", "GET /nowhere"]) == 2
    err = capsys.readouterr().err
    assert err == "error: no trace matched --id zz --route 'GET /nowhere' (6 read)\n"
    assert main_cli(["view", str(log), "--slowest", "0", "--no-open"]) == 2
    assert "--slowest wants 1 or more, got 0" in capsys.readouterr().err


def test_commands_read_a_running_apps_store(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.servers import serving

    app = AsyncTraceMiddleware(Starlette(routes=[
        Route("/orders/{order_id:int}/report", _report),  # 8 ms of queries: the slowest route
        Route("/health", _order_free),
    ]), log_traces=False, secret="s3cret")  # fmt: skip
    with serving(app) as base:
        ids = []
        for path in ("/orders/1/report", "/orders/3/report", "/orders/4/report", "/health"):
            response = httpx.get(base + path, headers={"X-Async-Trace": "s3cret"})
            ids.append(response.headers["x-async-trace-id"])
        # the app's address, or its store's, with the app's secret
        assert main_cli(["routes", base, "--secret", "s3cret"]) == 0
        out = capsys.readouterr().out
        assert out.startswith("4 trace(s), 2 route(s)")
        assert "GET /orders/{order_id}/report  (3 traces)" in out
        assert f"asgi-asynctrace compare {base} --route 'GET /orders/{{order_id}}/report'" in out
        assert main_cli(["summary", f"{base}/__asynctrace/", "--secret", "s3cret", "--id",
                         ids[1][:10]]) == 0  # fmt: skip
        assert capsys.readouterr().out.startswith("GET /orders/3/report 200 ")
        # without the secret the store is not this client's to read: said, exit status 2
        assert main_cli(["routes", base]) == 2
        err = capsys.readouterr().err
        assert f"{base}/__asynctrace/traces answered 404, not a list of traces" in err
        assert "with the app's --secret" in err
    from tests.servers import free_port

    gone = f"http://127.0.0.1:{free_port()}"
    assert main_cli(["routes", gone]) == 2
    assert f"error: {gone}/__asynctrace/traces: " in capsys.readouterr().err


def test_watch_prints_each_new_trace_of_a_running_app(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from asgi_asynctrace import _logs
    from tests.servers import serving

    looked = threading.Event()  # the watcher has taken its first look: what is older is old
    first_look = _logs.StoreReader.ids

    def ids(self: _logs.StoreReader) -> list[str]:
        got = first_look(self)
        looked.set()
        return got

    monkeypatch.setattr(_logs.StoreReader, "ids", ids)
    app = AsyncTraceMiddleware(Starlette(routes=[
        Route("/orders/{order_id:int}/report", _report),
        Route("/health", _order_free),
    ]), log_traces=False)  # fmt: skip
    with serving(app) as base:
        on = {"X-Async-Trace": "1"}
        old = httpx.get(base + "/orders/1/report", headers=on).headers["x-async-trace-id"]
        codes: list[int] = []
        watch = ["watch", base, "--interval", "0.05", "--count", "2",
                 "--route", "/orders/{order_id}/report"]  # fmt: skip
        watcher = threading.Thread(target=lambda: codes.append(main_cli(watch)))
        watcher.start()
        assert looked.wait(10)
        new = [httpx.get(base + path, headers=on).headers["x-async-trace-id"]
               for path in ("/health", "/orders/2/report", "/orders/3/report")]  # fmt: skip
        watcher.join(20)
        assert codes == [0]
    out, err = capsys.readouterr()
    assert err == f"watching {base}/__asynctrace (every 0.05 s; Ctrl-C to stop)\n"
    lines = out.splitlines()
    assert len(lines) == 2, out  # the two new orders, in the order they came; not the old one
    assert lines[0].endswith(new[1][:12]) and lines[1].endswith(new[2][:12])
    assert old[:12] not in out and new[0][:12] not in out
    second, third = lines
    assert "GET /orders/2/report 200" in second and "[high] blocked-loop" in second  # 30 ms block
    assert "GET /orders/3/report 200" in third and "db-query" in third
    assert main_cli(["watch", base, "--interval", "0"]) == 2
    assert "--interval wants seconds > 0, got 0" in capsys.readouterr().err


def test_watch_waits_for_an_app_that_restarts(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from asgi_asynctrace import _logs
    from tests.servers import free_port, serving

    looked, missed = threading.Event(), threading.Event()
    first_look = _logs.StoreReader.ids

    def ids(self: _logs.StoreReader) -> list[str]:
        try:
            got = first_look(self)
        except OSError:
            missed.set()
            raise
        looked.set()
        return got

    monkeypatch.setattr(_logs.StoreReader, "ids", ids)
    port = free_port()

    def app() -> Any:
        return AsyncTraceMiddleware(Starlette(routes=[Route("/health", _order_free)]),
                                    log_traces=False)  # fmt: skip

    codes: list[int] = []
    with serving(app(), port=port) as base:
        watcher = threading.Thread(target=lambda: codes.append(
            main_cli(["watch", base, "--interval", "0.05", "--count", "1"])))  # fmt: skip
        watcher.start()
        assert looked.wait(10)
    assert missed.wait(10)  # the app is gone (a reload): the watcher keeps looking
    with serving(app(), port=port) as again:
        assert again == base
        trace_id = httpx.get(base + "/health", headers={"X-Async-Trace": "1"}).headers[
            "x-async-trace-id"]  # fmt: skip
        watcher.join(20)
    assert codes == [0]
    out, err = capsys.readouterr()
    assert out.rstrip().endswith(trace_id[:12]) and "GET /health 200" in out
    assert f"waiting for the app: {base}/__asynctrace/traces: " in err
    assert err.count("waiting for the app") == 1  # said once, however long it takes
    assert f"the app answers again: {base}/__asynctrace\n" in err


def test_routes_says_when_there_is_no_trace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.log"
    empty.write_text("INFO: nothing here\n")
    assert main_cli(["routes", str(empty)]) == 2
    assert f"{empty}: no trace found" in capsys.readouterr().err


def test_the_store_serves_its_traces_by_route() -> None:
    app = AsyncTraceMiddleware(_shop_app(), log_traces=False, store_size=3)

    async def main() -> list[Any]:
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
            got = []
            for path in ("/health", "/orders/1/lines", "/orders/2/lines", "/shops/n/items/a"):
                assert (await client.get(path, headers={"X-Async-Trace": "1"})).is_success
                got.append((await client.get("/__asynctrace/routes")).json())
            listed = (await client.get("/__asynctrace/traces")).json()["traces"]
            got.append(listed)
            return got

    with capture_traces() as traces:
        *answers, listed = run(main())
    assert [a["traces"] for a in answers] == [1, 2, 3, 3]  # the store keeps 3
    last = answers[-1]
    by = {r["route"]: r for r in last["routes"]}
    # /health fell out of the store; the routes are those of the traces it holds
    assert set(by) == {"/orders/{order_id}/lines", "/shops/{shop}/items/{name}"}
    assert by["/orders/{order_id}/lines"]["traces"] == 2
    orders = [t for t in traces if t.request["path"].startswith("/orders/")]
    slowest = max(orders, key=lambda t: t.duration_ns)
    assert by["/orders/{order_id}/lines"]["slowestTraceId"] == slowest.trace_id
    assert by["/orders/{order_id}/lines"]["maxNs"] == slowest.duration_ns
    assert {t["traceId"] for t in listed} == {t.trace_id for t in traces[1:]}


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_routes_says_how_far_it_is_on_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    samples = Path(__file__).resolve().parent.parent / "sample_app" / "traces"
    line = (samples / "items.json").read_bytes().replace(b"\n", b"")
    log = tmp_path / "day.log"
    log.write_bytes(b"".join(b"INFO: " + LOG_PREFIX.encode() + line + b"\n" for _ in range(250)))
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main_cli(["routes", str(log)]) == 0
    said = terminal.getvalue()
    assert said.startswith("\r100 trace(s) analysed\r200 trace(s) analysed")
    assert said.endswith("\r250 trace(s) analysed\n")
    assert "GET /items  (250 traces)" in capsys.readouterr().out


def test_a_trace_that_cannot_be_read_loses_no_other_from_the_routes() -> None:
    from asgi_asynctrace import failure_counts, reset_failures
    from asgi_asynctrace._endpoint import _routes_of
    from asgi_asynctrace._sinks import TraceStore

    class CutFile(TraceStore):  # as another worker's file cut short between list and read
        def trace(self, trace_id: str) -> Any:
            if trace_id == bad.trace_id:
                raise ValueError("cut short")
            return super().trace(trace_id)

    app = AsyncTraceMiddleware(_shop_app(), log_traces=False)

    async def main() -> None:
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
            for path in ("/health", "/orders/1/lines"):
                await client.get(path, headers={"X-Async-Trace": "1"})

    with capture_traces() as traces:
        run(main())
    _health, bad = traces
    store = CutFile(10)
    for t in traces:
        store(t)
    reset_failures()
    doc = orjson.loads(_routes_of(store, None))
    assert doc["traces"] == 1 and [r["route"] for r in doc["routes"]] == ["/health"]
    assert failure_counts() == {"routes": 1}
