from __future__ import annotations

import asyncio
from typing import Any

import pytest

from asgi_asynctrace import (
    Trace,
    annotate,
    current_resource,
    current_trace,
    start_resource,
)
from asgi_asynctrace._context import ACTIVE
from tests.helpers import run, traced


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


# -- record_call: how instrumentation records a library's async call (C and Python forms) -----


def _record_call_forms() -> list[str]:
    from asgi_asynctrace import _context

    return ["python", "c"] if _context.SCOPED_CALL_IN_C else ["python"]


@pytest.mark.parametrize("form", _record_call_forms())
def test_record_call_records_the_awaited_call_as_its_own_resource(
    form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import contextlib

    from asgi_asynctrace import _context, failure_counts
    from asgi_asynctrace._context import ACTIVE, record_call

    monkeypatch.setattr(_context, "_scoped_call_in_c", form == "c")

    async def lookup(key: str, fail: bool = False) -> str | None:
        inside = ACTIVE.get()
        assert inside is not None and inside[1].type == "cache-get"  # the call is current
        await asyncio.sleep(0)
        await asyncio.create_task(asyncio.sleep(0))  # a task the call caused
        if fail:
            raise KeyError(key)
        return None if key == "missing" else key.upper()

    def hit(result: object) -> dict[str, Any]:
        return {"hit": result is not None}

    def broken(result: object) -> dict[str, Any]:
        raise RuntimeError("the tracer's own bug")

    async def body() -> None:
        before = ACTIVE.get()
        assert await record_call("cache-get", lookup("a"), {"key": "a"}, hit) == "A"
        assert ACTIVE.get() == before  # the caller's resource again
        assert await record_call("cache-get", lookup("missing"), {"key": "missing"}, hit) is None
        with pytest.raises(KeyError):
            await record_call("cache-get", lookup("b", fail=True), {"key": "b"}, hit)
        task = asyncio.create_task(record_call("cache-get", lookup("c"), {"key": "c"}, None))
        assert await task == "C"  # a task accepts it as a coroutine
        slow = asyncio.create_task(record_call("cache-get", lookup_slowly(), {"key": "slow"}, None))
        await asyncio.sleep(0.001)
        slow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await slow
        assert await record_call("cache-get", lookup("d"), {"key": "d"}, broken) == "D"
        fut = asyncio.get_running_loop().create_future()
        fut.set_result("from a future")
        assert await record_call("cache-get", fut, {"key": "future"}, None) == "from a future"
        inner = asyncio.sleep(0)
        unawaited = record_call("cache-get", inner, {"key": "never"}, None)
        unawaited.close()  # never awaited: nothing recorded
        inner.close()

    async def lookup_slowly() -> None:
        await asyncio.sleep(5)

    trace = traced(body)
    calls = [r for r in trace.resources if r.type == "cache-get"]
    notes = [trace.annotations_of(r.async_id) for r in calls]
    assert [n["key"] for n in notes] == ["a", "missing", "b", "c", "slow", "d", "future"]
    assert [r.state for r in calls] == ["ok", "ok", "error", "ok", "cancelled", "ok", "ok"]
    assert [n.get("hit") for n in notes] == [True, False, None, None, None, None, None]
    assert notes[2]["error"] == "KeyError"
    for call in (calls[0], calls[3]):  # what ran inside the call was caused by it
        assert any(r.type == "task" and r.trigger_id == call.async_id for r in trace.resources)
    assert failure_counts() == {"start_resource": 1}  # the broken done(), counted


@pytest.mark.skipif("c" not in _record_call_forms(), reason="the C accelerator is not built")
def test_record_calls_c_form_acts_as_a_coroutine() -> None:
    from asgi_asynctrace._context import ACTIVE, record_call

    async def value() -> int:
        await asyncio.sleep(0)
        return 7

    async def body() -> None:
        call = record_call("cache-get", value(), {}, None)
        assert asyncio.iscoroutine(call)
        assert "coroutine object" in repr(call) and call.cr_frame is not None  # type: ignore[attr-defined]
        assert await call == 7
        with pytest.raises(RuntimeError, match="cannot reuse"):
            await call
        started = record_call("cache-get", value(), {}, None)
        started.send(None)
        started.close()
        assert ACTIVE.get() is not None

    trace = traced(body)
    states = [r.state for r in trace.resources if r.type == "cache-get"]
    assert states[0] == "ok" and len(states) == 2


@pytest.mark.skipif("c" not in _record_call_forms(), reason="the C accelerator is not built")
def test_the_call_recorder_instrumentation_keeps_is_the_c_form_and_checks_its_arguments(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from asgi_asynctrace import _context
    from asgi_asynctrace._context import ACTIVE, call_recorder

    record: Any = call_recorder()

    async def value() -> int:
        return 3

    async def body() -> None:
        assert await record("cache-get", value(), {"key": "k"}, lambda r: {"hit": r == 3}) == 3

    trace = traced(body)
    (res,) = [r for r in trace.resources if r.type == "cache-get"]
    assert trace.annotations_of(res.async_id) == {"key": "k", "hit": True}
    assert res.state == "ok"
    awaitable = object()  # never awaited: the arguments are refused first
    for bad in [("cache-get", awaitable, [], None), ("cache-get", awaitable, {}, 5),
                (1, awaitable, {}, None), ("cache-get", awaitable, {})]:  # fmt: skip
        with pytest.raises(TypeError, match="ScopedCall"):
            record(*bad)
    with pytest.raises(TypeError, match="ScopedCall"):
        _context._CScopedCall(ACTIVE, "cache-get", awaitable, {}, None, extra=1)
    monkeypatch.setattr(_context, "_scoped_call_in_c", False)
    assert call_recorder() is _context._record_call  # the Python form, when asked for
