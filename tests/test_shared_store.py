"""The trace store shared by worker processes through a directory (``store_dir``)."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from asgi_asynctrace import AsyncTraceMiddleware, Trace, failure_counts, reset_failures
from asgi_asynctrace._sinks import TraceStore

from .servers import app_process


def _trace(path: str) -> Trace:
    trace = Trace.start(request={"method": "GET", "path": path, "status": 200})
    trace.finish(trace.origin + 1_000_000)
    return trace


def test_workers_sharing_a_directory_serve_each_others_traces(tmp_path: Path) -> None:
    mine, theirs = TraceStore(10, tmp_path), TraceStore(10, tmp_path)  # two workers' stores
    assert mine.needs_json and TraceStore(10).needs_json is False  # files need the JSON
    a, b = _trace("/a"), _trace("/b")
    mine(a)  # given no JSON (as by a caller that did not ask): made for the file
    theirs(b, b.to_json())
    assert mine.shared is not None and theirs.shared is not None
    mine.shared.flush()
    theirs.shared.flush()
    assert theirs.get(a.trace_id) == mine.get(a.trace_id) == a.to_json()
    assert mine.get(b.trace_id) == b.to_json()
    listed = mine.summaries()
    assert [s["traceId"] for s in listed] == [b.trace_id, a.trace_id]  # newest first, once each
    assert listed == theirs.summaries()
    assert listed[0] == {"traceId": b.trace_id, "method": "GET", "path": "/b", "status": 200,
                         "state": "ok", "startedAtUnixNs": b.started_at_unix_ns,
                         "durationNs": 1_000_000, "resources": 1}  # fmt: skip
    assert oct(os.stat(tmp_path / f"{a.trace_id}.json").st_mode & 0o777) == "0o600"


def test_the_directory_keeps_the_newest_traces(tmp_path: Path) -> None:
    store = TraceStore(4, tmp_path)
    traces = [_trace(f"/{i}") for i in range(10)]
    for t in traces:
        store(t, t.to_json())
        assert store.shared is not None
        store.shared.flush()  # one at a time: each file newer than the last
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{t.trace_id}.json" for t in traces[-4:]
    )  # and no temporary file left behind
    other = TraceStore(4, tmp_path)
    assert other.get(traces[0].trace_id) is None
    assert [s["path"] for s in other.summaries()] == ["/9", "/8", "/7", "/6"]


def test_what_is_not_a_trace_in_the_directory_is_left_alone(tmp_path: Path) -> None:
    store = TraceStore(10, tmp_path / "new" / "dir")  # made when missing
    (tmp_path / "secret").write_text("do not serve")
    (tmp_path / "new" / "dir" / "junk.json").write_text("not json")
    assert store.get("../../secret") is None and store.get("..") is None
    assert store.get("junk") == b"not json"  # a file by its id: the reader finds it is no trace
    assert store.summaries() == []  # but the list leaves it out


async def _app(scope: Any, receive: Any, send: Any) -> None:
    pass


def test_bad_store_dir_settings_fail_at_startup(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs store_size > 0"):
        AsyncTraceMiddleware(_app, store_size=0, store_dir=tmp_path, instrument=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="cannot be made"):
        AsyncTraceMiddleware(_app, store_dir=tmp_path / "file", instrument=False)


def test_a_directory_gone_after_start_is_counted_not_raised(tmp_path: Path) -> None:
    reset_failures()
    store = TraceStore(10, tmp_path / "d")
    (tmp_path / "d").rmdir()
    t = _trace("/x")
    store(t, t.to_json())  # the request's side: queued, returns at once
    assert store.shared is not None
    store.shared.flush()
    assert failure_counts().get("store-dir") == 1
    assert store.get(t.trace_id) == t.to_json()  # this worker still has it in memory
    assert [s["traceId"] for s in store.summaries()] == [t.trace_id]  # and lists it
    assert store.get("f" * 32) is None  # what it does not hold: none, and no exception
    assert failure_counts()["store-dir"] >= 2  # the listing's failure, counted too


def test_uvicorn_workers_serve_every_trace_whichever_worker_answers(tmp_path: Path) -> None:
    env = {"WORKERS_STORE_DIR": str(tmp_path)}
    command = ["uvicorn", "tests.workers_app:app", "--workers", "2", "--log-level", "warning"]
    with app_process(command, env) as (base, _):

        def traced(_: int) -> tuple[str, str]:
            got = httpx.get(f"{base}/pid", headers={"X-Async-Trace": "1"}, timeout=30)
            return got.text, got.headers["x-async-trace-id"]

        with ThreadPoolExecutor(6) as pool:  # together: each worker's loop is held 0.2 s
            answered = list(pool.map(traced, range(6)))
        assert len({pid for pid, _ in answered}) == 2, answered  # both workers traced some
        # A trace is stored once its response has gone out, and written by a thread after that.
        deadline = time.monotonic() + 10
        while len(list(tmp_path.glob("*.json"))) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        for _, trace_id in answered:
            for _ in range(4):  # a new connection each time: either worker may answer
                got = httpx.get(f"{base}/__asynctrace/traces/{trace_id}", timeout=30)
                assert got.status_code == 200, got.text
                assert orjson.loads(got.content)["traceId"] == trace_id
        for _ in range(4):
            listed = httpx.get(f"{base}/__asynctrace/traces", timeout=30).json()["traces"]
            assert {t["traceId"] for t in listed} == {i for _, i in answered}
