"""The sample app under a real uvicorn process, as a user runs it."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from asgi_asynctrace import LOG_PREFIX, decode_trace_header
from tests.servers import sample_app_process, stored

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    env = {"SAMPLE_DB": str(tmp_path / "sample.db")}
    with sample_app_process(env, stderr=subprocess.PIPE) as running:
        yield running


def test_uvicorn_logs_the_whole_trace_on_stderr_and_headers_carry_its_start(
    server: tuple[str, subprocess.Popen[bytes]],
) -> None:
    base, proc = server
    traced = httpx.get(base + "/items", headers={"X-Async-Trace": "1"})  # a cache miss
    untraced = httpx.get(base + "/items")
    assert traced.json() == untraced.json()
    assert "x-async-trace-id" not in untraced.headers
    trace_id = traced.headers["x-async-trace-id"]
    # The first /items trace (its stack table new to the process) is over what fits in 4 KiB
    # of headers: the header says where the whole trace is, and the store has it.
    data = traced.headers["x-async-trace-data"]
    assert data.startswith("omitted: ") and "kept within 4096" in data, data
    assert len(b"".join(k + v for k, v in traced.headers.raw)) < 4096 - 192
    whole = stored(base + data.rsplit("; GET ", 1)[1])
    assert whole.status_code == 200 and whole.json()["traceId"] == trace_id
    small = httpx.get(base + "/nested", headers={"X-Async-Trace": "1"})  # one that fits
    inline = decode_trace_header(small.headers["x-async-trace-data"])
    assert inline["traceId"] == small.headers["x-async-trace-id"]

    proc.terminate()
    proc.wait(10)
    assert proc.stderr is not None
    lines = [ln for ln in proc.stderr.read().decode().splitlines() if LOG_PREFIX in ln]
    assert len(lines) == 2
    (trace,) = [t for t in map(lambda ln: orjson.loads(ln.split(LOG_PREFIX, 1)[1]), lines)
                if t["traceId"] == trace_id]  # fmt: skip
    assert trace["traceId"] == trace_id and trace["request"]["status"] == 200
    types = [r["type"] for r in trace["resources"]]
    assert types[0] == "root"
    assert {"task", "cache-get", "cache-put", "db-query", "fetch", "timer"} <= set(types)
    notes: dict[int, dict[str, object]] = {}
    for a in trace["annotations"]:
        notes.setdefault(a["asyncId"], {})[a["key"]] = a["value"]
    by_type = {r["type"]: r for r in trace["resources"]}
    assert notes[by_type["cache-get"]["asyncId"]]["hit"] is False
    assert notes[by_type["cache-put"]["asyncId"]]["ttl"] == 30
    # the upstream's sleep happened for a fetch: timer <- ... <- fetch <- task <- root
    parents = {r["asyncId"]: r["triggerId"] for r in trace["resources"]}
    fetches = {r["asyncId"] for r in trace["resources"] if r["type"] == "fetch"}
    timers = [r for r in trace["resources"] if r["type"] == "timer"]
    sleeps = [t for t in timers if notes[t["asyncId"]]["kind"] == "sleep"]
    assert len(sleeps) == 3  # one per price() call: three items
    for timer in sleeps:
        chain, node = [], timer["asyncId"]
        while node:
            node = parents[node]
            chain.append(node)
        assert fetches & set(chain) and timer["state"] == "ok"
    # aiocache's memory backend expires a key with a timer: still pending when the request ends
    later = [t for t in timers if notes[t["asyncId"]]["kind"] == "call_later"]
    expiries = [t for t in later if "__delete" in str(notes[t["asyncId"]]["callback"])]
    assert len(expiries) == 1, [notes[t["asyncId"]] for t in later]
    expiry = expiries[0]
    assert notes[expiry["asyncId"]]["delayMs"] == 30_000 and expiry["state"] == "pending"
    tasks = [r for r in trace["resources"] if r["type"] == "task"]
    assert all(t["state"] == "ok" for t in tasks)
    prices = [t for t in tasks if notes[t["asyncId"]].get("coroutine") == "price"]
    assert len(prices) == 3 and all(t["triggerId"] == 1 for t in prices)
    frames = [f for s in trace["stackTraces"] for f in s["frames"]]
    assert any(f.startswith("items @ sample_app/app.py:") for f in frames)
