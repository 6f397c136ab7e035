"""A Litestar app, wrapped by the middleware and served by uvicorn: an async handler's awaits
and fetches, its route's template from Litestar's path parameters, and a sync handler run in a
worker thread (``sync_to_thread=True``)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from asgi_asynctrace import AsyncTraceMiddleware, analyze
from tests.helpers import price_twice
from tests.servers import serving, traced_get

litestar: Any = pytest.importorskip("litestar")
params: Any = pytest.importorskip("litestar.params")


async def lines(order_id: int) -> dict[str, Any]:
    """An async handler: a sleep, then the same price fetched twice (once would do)."""
    return {"order": order_id, "prices": await price_twice()}


def ledger() -> str:
    """A sync handler: Litestar runs it in a worker thread."""
    time.sleep(0.004)
    return "ledger"


lines.__annotations__["order_id"] = params.FromPath[int]  # the style Litestar 2.25 asks for


@pytest.fixture(scope="module")
def litestar_app() -> Iterator[str]:
    app = litestar.Litestar(
        route_handlers=[litestar.get("/orders/{order_id:int}/lines")(lines),
                        litestar.get("/ledger", sync_to_thread=True)(ledger)],
        logging_config=None,
    )  # fmt: skip
    with serving(AsyncTraceMiddleware(app, log_traces=False), lifespan="off") as base:
        yield base


def test_an_async_litestar_handler_records_its_awaits_fetches_and_route(
    litestar_app: str,
) -> None:
    response, trace = traced_get(litestar_app, "/orders/42/lines")
    assert response.status_code == 200
    assert response.json() == {"order": 42, "prices": ["1.5", "1.5"]}
    assert response.headers["x-async-trace-id"] == trace.trace_id
    root = trace.annotations_of(1)
    assert root["route"] == "/orders/{order_id}/lines" and root["status"] == 200
    fetches = [r for r in trace.resources if r.type == "fetch"]
    assert len(fetches) == 2 and all(r.state == "ok" for r in fetches)
    kinds = [trace.annotations_of(r.async_id).get("kind") for r in trace.resources]
    assert kinds.count("sleep") >= 3  # the handler's own and the upstream's two
    a = analyze(trace)
    path = [(s.type, s.label) for s in a.critical_path if s.type not in ("timer", "root")]
    assert path[-3:] == [("fetch", "GET http://pricing/price")] * 2 + [
        ("stream-write", f"response body, {len(response.content)} bytes")]  # fmt: skip
    (repeat,) = [f for f in a.findings if f.kind == "repeated-read"]
    assert repeat.site.startswith("price_twice @ tests/helpers.py:")
    assert any(frame.startswith("lines @ tests/test_litestar.py:") for frame in repeat.stack)


def test_a_sync_litestar_handler_runs_in_a_recorded_thread(litestar_app: str) -> None:
    response, trace = traced_get(litestar_app, "/ledger")
    assert response.status_code == 200 and response.text == "ledger"
    threads = [r for r in trace.resources if r.type == "thread"]
    assert threads and all(r.state == "ok" for r in threads)
    ran = max(r.callbacks[1] - r.callbacks[0] for r in threads if len(r.callbacks) >= 2)
    assert ran >= 4_000_000  # the handler's 4 ms ran inside one of them
