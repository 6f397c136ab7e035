from __future__ import annotations

import asyncio

import pytest

from asgi_asynctrace import (
    Trace,
    annotate,
    current_resource,
    current_trace,
    start_resource,
)
from asgi_asynctrace._context import ACTIVE
from tests.helpers import run


async def _in_trace(body: object) -> Trace:
    trace = Trace.start()
    token = ACTIVE.set((trace, trace.root))
    try:
        await body()  # type: ignore[operator]
    finally:
        ACTIVE.reset(token)
    trace.finish(trace.origin + 1)
    return trace


def test_outside_a_trace_the_helpers_record_nothing_and_change_nothing() -> None:
    assert current_trace() is None and current_resource() is None
    annotate("k", "v")
    with start_resource("cache-get", key="k") as scope:
        assert scope.resource is None
        scope.annotate("hit", True)


def test_a_block_becomes_a_resource_caused_by_the_current_one_and_current_inside() -> None:
    seen: list[object] = []

    async def body() -> None:
        async with start_resource("cache-get", key="user:1") as scope:
            seen.append(current_resource())
            await asyncio.sleep(0)
            scope.annotate("hit", False)
            annotate("size", 0)
        seen.append(current_resource())

    trace = run(_in_trace(body))
    res = trace.resources[1]
    assert seen == [res, trace.root]
    assert (res.type, res.trigger_id, res.state) == ("cache-get", 1, "ok")
    assert res.settled_at is not None and res.settled_at >= res.created_at
    assert trace.annotations_of(2) == {"key": "user:1", "hit": False, "size": 0}
    assert res.stack_id is not None
    assert trace.stacks[res.stack_id][0].split(" @ ")[0].endswith("body")


def test_an_exception_settles_the_resource_as_error_and_still_propagates() -> None:
    error = KeyError("missing")

    async def body() -> None:
        with pytest.raises(KeyError) as caught, start_resource("kv-get"):
            raise error
        assert caught.value is error

    trace = run(_in_trace(body))
    assert trace.resources[1].state == "error"
    assert trace.annotations_of(2) == {"error": "KeyError"}


def test_a_cancelled_block_is_recorded_as_cancelled() -> None:
    async def body() -> None:
        async def waits() -> None:
            async with start_resource("fetch", url="http://x"):
                await asyncio.sleep(10)

        task = asyncio.ensure_future(waits())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    trace = run(_in_trace(body))
    fetch = next(r for r in trace.resources if r.type == "fetch")
    assert fetch.state == "cancelled"


def test_the_decorator_records_each_call_of_sync_and_async_functions() -> None:
    @start_resource("db-query", statement="select 1")
    def query() -> int:
        return 1

    @start_resource("fetch")
    async def fetch() -> int:
        await asyncio.sleep(0)
        return 2

    async def body() -> None:
        assert query() + query() + await fetch() == 4

    trace = run(_in_trace(body))
    assert [r.type for r in trace.resources] == ["root", "db-query", "db-query", "fetch"]
    assert trace.annotations_of(2) == {"statement": "select 1"}


def test_a_resource_type_must_be_kebab_case() -> None:
    with pytest.raises(ValueError, match="kebab-case"):
        start_resource("CacheGet")
    with pytest.raises(ValueError, match="kebab-case"):
        start_resource("cache_get")
    start_resource("my-custom-op")
