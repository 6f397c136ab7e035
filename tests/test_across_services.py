"""One request across two services, each a real uvicorn app on loopback: traced in both,
and joined into one trace with the backend's root under the frontend's fetch."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_asynctrace import AnalysisSettings, AsyncTraceMiddleware, analyze, load_trace
from asgi_asynctrace._cli import main
from asgi_asynctrace._join import join_traces
from tests.servers import free_port, serving


@pytest.fixture
def services() -> Iterator[tuple[str, str]]:
    back_port, front_port, elsewhere = free_port(), free_port(), free_port()

    async def stock(request: Request) -> Response:
        await asyncio.sleep(0.01)
        return PlainTextResponse("7")

    async def page(request: Request) -> Response:
        async with httpx.AsyncClient() as client:  # the global httpx switch wraps it
            stock = (await client.get(f"http://127.0.0.1:{back_port}/stock")).text
            # a host not in propagate_to learns nothing of the trace
            with contextlib.suppress(httpx.TransportError):
                await client.get(f"http://127.0.0.1:{elsewhere}/", timeout=0.5)
        return PlainTextResponse(f"in stock: {stock}")

    backend = AsyncTraceMiddleware(Starlette(routes=[Route("/stock", stock)]), log_traces=False)
    frontend = AsyncTraceMiddleware(Starlette(routes=[Route("/page", page)]), log_traces=False,
                                    propagate_to=[f"127.0.0.1:{back_port}"])  # fmt: skip
    with serving(backend, back_port) as back, serving(frontend, front_port) as front:
        yield front, back


def _stored(base: str) -> list[bytes]:
    for _ in range(50):
        listing = httpx.get(base + "/__asynctrace/traces").json()["traces"]
        if listing:
            return [httpx.get(f"{base}/__asynctrace/traces/{t['traceId']}").content
                    for t in listing]  # fmt: skip
        time.sleep(0.05)
    return []


def test_the_backend_traces_the_call_and_joins_under_the_frontends_fetch(
    services: tuple[str, str], tmp_path: Path
) -> None:
    front, back = services
    response = httpx.get(front + "/page", headers={"X-Async-Trace": "1"})
    assert response.text == "in stock: 7"
    (front_data,) = _stored(front)
    (back_data,) = _stored(back)
    upstream, downstream = load_trace(front_data), load_trace(back_data)
    fetches = [r for r in upstream.resources if r.type == "fetch"]
    assert len(fetches) == 2
    told = [upstream.annotations_of(f.async_id).get("propagated") for f in fetches]
    assert told == [True, None]  # only toward the allowed host
    assert downstream.request["parent"] == {"traceId": upstream.trace_id,
                                            "asyncId": fetches[0].async_id}  # fmt: skip

    (whole,) = join_traces([downstream, upstream])
    remote = next(r for r in whole.resources if r.type == "remote-root")
    assert remote.trigger_id == fetches[0].async_id
    assert len(whole.resources) == len(upstream.resources) + len(downstream.resources)
    # placed by wall clock: the backend's work happened while the fetch was in flight
    fetch = next(r for r in whole.resources if r.async_id == fetches[0].async_id)
    assert fetch.settled_at is not None and remote.settled_at is not None
    assert fetch.created_at <= remote.created_at <= remote.settled_at <= fetch.settled_at
    # the backend's sleep: numbered after the frontend's resources, under the remote root
    (sleep,) = [r for r in whole.resources if r.type == "timer" and r.async_id > remote.async_id
                and whole.annotations_of(r.async_id).get("kind") == "sleep"]  # fmt: skip
    assert sleep.settled_at is not None
    assert fetch.created_at < sleep.created_at < sleep.settled_at < fetch.settled_at
    # the frontend waited on the fetch, and inside it (after the connection was set up) on
    # the backend's request: the remote root is on the path, one level under that fetch
    quiet = AnalysisSettings(own_code_ms=10_000, own_code_share=1.0)  # a busy machine's stalls
    path = [(s.async_id, s.depth) for s in analyze(whole, quiet).critical_path]
    assert path[0] == (fetch.async_id, 0)
    assert (remote.async_id, 1) in path[: path.index((fetch.async_id, 0)) + 4]

    (tmp_path / "front.json").write_bytes(front_data)
    (tmp_path / "back.json").write_bytes(back_data)
    out = tmp_path / "whole.jsonl"
    assert main(["join", str(tmp_path / "back.json"), str(tmp_path / "front.json"),
                 "-o", str(out)]) == 0  # fmt: skip
    (line,) = out.read_bytes().splitlines()
    assert sum(r.type == "remote-root" for r in load_trace(line).resources) == 1


def test_a_forged_parent_header_from_an_untraced_or_remote_client_is_ignored(
    services: tuple[str, str],
) -> None:
    _, back = services
    httpx.get(back + "/stock", headers={"X-Async-Trace-Parent": "0" * 32 + ":1"})
    httpx.get(back + "/stock", headers={"X-Async-Trace": "1", "X-Async-Trace-Parent": "nope"})
    (data,) = _stored(back)
    assert "parent" not in load_trace(data).request
