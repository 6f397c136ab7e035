"""Every route of the sample app, traced, shows the pattern it is there to show."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from asgi_asynctrace import AnalysisSettings, Trace, analyze, capture_traces
from tests.helpers import run
from tests.servers import sample_app_process


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    import os

    os.environ["SAMPLE_DB"] = str(tmp_path_factory.mktemp("sample") / "sample.db")
    from sample_app import patterns
    from sample_app.app import app

    patterns.DATABASE_URL = f"sqlite+aiosqlite:///{os.environ['SAMPLE_DB']}"
    patterns._engine = None
    yield app
    patterns._engine = None


def traced_get(app: Any, path: str) -> tuple[httpx.Response, Trace]:
    async def main() -> httpx.Response:
        from sample_app import patterns

        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://sample") as client:
            response = await client.get(path, headers={"X-Async-Trace": "1"})
        if patterns._engine is not None:  # its connections belong to this loop
            await patterns._engine.dispose()
            patterns._engine = None
        return response

    with capture_traces() as traces:
        response = run(main())
    assert response.status_code == 200, response.text
    assert len(traces) == 1
    return response, traces[0]


def types(trace: Trace) -> set[str]:
    return {r.type for r in trace.resources}


def kinds(trace: Trace, blocking: bool = True) -> list[str]:
    """The findings' kinds; without blocked-loop and loop-busy ones unless ``blocking`` (on a
    busy machine a step can stretch past the threshold, a timer run late; only /slow plants a
    real one)."""
    settings = None if blocking else AnalysisSettings(blocked_step_ms=10_000, loop_busy_ms=10_000)
    return [f.kind for f in analyze(trace, settings).findings]


def test_the_index_links_every_route_to_its_trace_in_the_viewer(sample: Any) -> None:
    from sample_app.app import ROUTES

    async def main() -> tuple[str, str]:
        transport = httpx.ASGITransport(app=sample, client=("127.0.0.1", 5000))
        base = "http://sample:8811"
        async with httpx.AsyncClient(transport=transport, base_url=base) as client:
            return (await client.get("/")).text, (await client.get("/chat")).text

    page, chat = run(main())
    for path in ROUTES:
        assert f'href="/__asynctrace/?run={path}"' in page
    # The commands it shows name where the app is served, not a default port.
    assert "curl -si -H 'X-Async-Trace: 1' http://sample:8811/items" in page
    assert "asgi-asynctrace trace http://sample:8811/slow" in page
    assert "asgi-asynctrace watch http://sample:8811</code>" in page
    assert "8000" not in page
    assert "ws://sample:8811/ws" in chat and "8000" not in chat


def test_items_is_cache_aside_then_parallel_fetches(sample: Any) -> None:
    response, trace = traced_get(sample, "/items")
    assert len(response.json()["prices"]) == 3
    assert {"cache-get", "db-query", "cache-put", "fetch", "timer", "task"} <= types(trace)
    assert not {"n-plus-one", "sequential-awaits"} & set(kinds(trace))


def test_sequential_and_slow_carry_their_planted_problems(sample: Any) -> None:
    _, trace = traced_get(sample, "/sequential")
    assert kinds(trace, blocking=False)[0] in ("n-plus-one", "sequential-awaits")
    _, trace = traced_get(sample, "/slow")
    assert {"n-plus-one", "blocked-loop", "repeated-read"} <= set(kinds(trace))
    (repeated,) = [f for f in analyze(trace).findings if f.kind == "repeated-read"]
    assert "GET http://pricing/price/discount?ms=* was read 2 times" in repeated.title
    assert repeated.site.startswith("slow_report @ sample_app/patterns.py:")  # the second read
    # and the blocked-loop finding names the blocking call's line, from the watchdog's sample
    from sample_app import patterns

    lines, first = inspect.getsourcelines(patterns.slow_report)
    line = first + next(i for i, text in enumerate(lines) if "time.sleep(" in text)
    where = f"slow_report @ sample_app/patterns.py:{line}:"
    # (on a starved machine another step can run past the threshold too: a second finding)
    blocked = [f for f in analyze(trace).findings if f.kind == "blocked-loop"]
    assert [f for f in blocked if f.site.startswith(where)], [f.site for f in blocked]


def test_the_committed_samples_show_their_routes_patterns_and_only_the_planted_problems() -> None:
    # What sample_app/generate.py wrote: a sample that caught a first request's imports, or a
    # full collection that happened to fall in it, would show that instead of its pattern.
    from asgi_asynctrace import load_trace

    folder = Path(__file__).resolve().parent.parent / "sample_app" / "traces"
    found = {p.stem: kinds(load_trace(p.read_bytes())) for p in sorted(folder.glob("*.json"))}
    from sample_app.app import ROUTES

    # one sample for each route but the chat page
    expected = {path.strip("/").replace("/", "-") for path in ROUTES if path != "/chat"}
    assert set(found) == expected, sorted(found)
    planted = {"sequential": ["n-plus-one"],
               "slow": ["blocked-loop", "n-plus-one", "repeated-read"]}  # fmt: skip
    assert {name: sorted(k) for name, k in found.items() if k} == planted, found
    items = load_trace((folder / "items.json").read_bytes())
    story = ("cache-get", "db-query", "cache-put")  # a miss, the query, the put; no schema
    assert [r.type for r in items.resources if r.type in story] == list(story)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/parallel", {"fetch", "task"}),
        ("/race", {"fetch", "task", "timer"}),
        ("/nested", {"task", "timer"}),
        ("/iteration", {"timer"}),
        ("/timers", {"timer", "future"}),  # wait_for makes a task only before 3.12
        ("/cache", {"cache-get", "cache-put", "cache-delete"}),
        ("/sql", {"db-query"}),
        ("/sync", {"thread"}),
        ("/stream", {"stream-write", "timer"}),
        ("/fastapi/items", {"thread", "fetch", "cache-get"}),
        ("/fastapi/sync", {"thread"}),
    ],
)
def test_each_route_records_what_it_shows(sample: Any, path: str, expected: set[str]) -> None:
    _, trace = traced_get(sample, path)
    assert expected <= types(trace), types(trace)
    assert trace.root.state == "ok"


def test_a_route_with_a_parameter_is_recorded_as_its_template(sample: Any) -> None:
    response, trace = traced_get(sample, "/fastapi/items/2")
    assert response.json()["item"] == {"id": 2, "name": "pear"}
    assert {"db-query", "fetch"} <= types(trace)
    notes = trace.annotations_of(trace.root.async_id)
    assert (notes["path"], notes["route"]) == ("/fastapi/items/2", "/fastapi/items/{item_id}")


def test_the_race_cancels_the_loser_and_nested_tasks_chain(sample: Any) -> None:
    _, trace = traced_get(sample, "/race")
    states = [r.state for r in trace.resources if r.type == "task"]
    assert "cancelled" in states
    _, trace = traced_get(sample, "/nested")
    chain = [r for r in trace.resources if r.type == "task"]
    assert len(chain) == 3 and [r.trigger_id for r in chain[1:]] == [chain[0].async_id,
                                                                     chain[1].async_id]  # fmt: skip


def test_the_chat_room_over_a_real_server(tmp_path: Path) -> None:
    import time

    import websockets

    with sample_app_process({"SAMPLE_DB": str(tmp_path / "chat.db")}) as (base, _):
        port = base.rsplit(":", 1)[1]

        async def talk() -> list[str]:
            url = f"ws://127.0.0.1:{port}/ws"
            async with websockets.connect(url, additional_headers={"X-Async-Trace": "1"}) as a, \
                    websockets.connect(url) as b:  # fmt: skip
                await a.send("hello room")
                heard = [str(await asyncio.wait_for(a.recv(), 5)),
                         str(await asyncio.wait_for(b.recv(), 5))]  # fmt: skip
            return heard

        assert asyncio.run(talk()) == ["hello room", "hello room"]
        listing: list[dict[str, Any]] = []
        for _ in range(50):  # the trace is stored once the connection has closed
            listing = httpx.get(f"http://127.0.0.1:{port}/__asynctrace/traces").json()["traces"]
            if listing:
                break
            time.sleep(0.1)
        (summary,) = listing  # only the connection that asked is traced
        assert summary["method"] == "WS" and summary["path"] == "/ws"
        doc = httpx.get(f"http://127.0.0.1:{port}/__asynctrace/traces/{summary['traceId']}").json()
        notes = {(a["asyncId"], a["key"]): a["value"] for a in doc["annotations"]}
        messages = [r for r in doc["resources"] if r["type"] == "websocket"]
        seen = [(notes[(r["asyncId"], "direction")], notes[(r["asyncId"], "message")])
                for r in messages]  # fmt: skip
        # what went through this connection (the send to b went through b's own), up to the
        # client closing it
        assert seen == [("receive", "text"), ("send", "text"), ("receive", "close")]
        assert sum(r["type"] == "task" for r in doc["resources"]) == 2  # gather: one per member


@pytest.mark.service("redis")
@pytest.mark.service("postgres")
def test_the_sample_runs_on_redis_and_postgresql_when_their_urls_are_set() -> None:
    env = {"SAMPLE_REDIS_URL": "redis://127.0.0.1:6379",
           "SAMPLE_DATABASE_URL": "postgresql+asyncpg://postgres@127.0.0.1:5432/test"}  # fmt: skip
    with sample_app_process(env) as (base, _):
        port = base.rsplit(":", 1)[1]
        response = httpx.get(f"{base}/sql", headers={"X-Async-Trace": "1"}, timeout=10)
        assert response.status_code == 200 and len(response.json()["items"]) == 3
        cached = httpx.get(f"http://127.0.0.1:{port}/cache", headers={"X-Async-Trace": "1"})
        assert cached.json() == {"miss": None, "hit": 1}
        listing = httpx.get(f"http://127.0.0.1:{port}/__asynctrace/traces").json()["traces"]
        docs = [httpx.get(f"http://127.0.0.1:{port}/__asynctrace/traces/{t['traceId']}").json()
                for t in listing]  # fmt: skip
        notes = [a for d in docs for a in d["annotations"]]
        assert {"key": "driver", "value": "asyncpg"} in [
            {"key": a["key"], "value": a["value"]} for a in notes]  # fmt: skip
        assert any(a["key"] == "backend" and a["value"] == "aiocache:redis" for a in notes)
        assert any(r["type"] == "kv-get" for d in docs for r in d["resources"])


def test_slow_over_a_real_server_names_the_line_that_blocked_its_loop(tmp_path: Path) -> None:
    # uvicorn as a user runs it (on uvloop, when it is installed): the watchdog's thread, the
    # store and the served analysis, end to end
    from sample_app import patterns

    lines, first = inspect.getsourcelines(patterns.slow_report)
    line = first + next(i for i, text in enumerate(lines) if "time.sleep(" in text)
    where = f"slow_report @ sample_app/patterns.py:{line}:"
    with sample_app_process({"SAMPLE_DB": str(tmp_path / "slow.db")}) as (base, _):
        response = httpx.get(f"{base}/slow", headers={"X-Async-Trace": "1"}, timeout=30)
        assert response.status_code == 200
        trace_id = response.headers["x-async-trace-id"]
        served = httpx.get(f"{base}/__asynctrace/traces/{trace_id}?analysis=1", timeout=30)
    body = served.json()
    # (a cold server's first request may block elsewhere too: its first connection, say)
    at_sleep = [s for s in body["trace"]["samples"] if s["frames"][0].startswith(where)]
    assert at_sleep and all(s["asyncId"] == 1 for s in at_sleep)  # the request's own code
    (blocked,) = [f for f in body["analysis"]["findings"]
                  if f["kind"] == "blocked-loop" and f["site"].startswith(where)]  # fmt: skip
    assert blocked["costNs"] >= 30_000_000
    # every stack ends in the request's task (uvicorn's protocol), not in the process that
    # runs the loop (asyncio.Runner, uvicorn's main, click), whatever loop uvicorn chose
    walks = [s["frames"] for s in body["trace"]["stackTraces"] + body["trace"]["samples"]]
    outside = ("<stdlib>/asyncio/runners.py", "site-packages/uvicorn/main.py", "/click/")
    assert walks and not [f for w in walks for f in w if any(o in f for o in outside)]
