"""Thread-pool jobs and the bridges between a thread and the loop: their work recorded inside
the thread, linked to the task that started it."""

from __future__ import annotations

import asyncio
import time

import pytest

from asgi_asynctrace import (
    annotate,
    start_resource,
)
from tests.helpers import (
    assert_plausible,
    by_label,
    traced,
    tree,
    untimed,
)


def test_a_sync_function_in_the_thread_pool_records_its_work_inside_the_thread() -> None:
    def blocking() -> int:
        time.sleep(0.005)
        with start_resource("db-query", statement="select 1"):
            annotate("rows", 1)
        return 1

    async def body() -> None:
        import anyio.to_thread

        assert await asyncio.to_thread(blocking) == 1
        assert await anyio.to_thread.run_sync(blocking) == 1
        assert await asyncio.get_running_loop().run_in_executor(None, blocking) == 1

    trace = traced(body)
    assert tree(trace) == [("thread:blocking", [("db-query", [])])] * 3
    for job in (r for r in trace.resources if r.type == "thread"):
        ((start, end),) = job.intervals()
        assert end is not None and end - start >= 5_000_000  # the sleep ran inside the step
        assert job.created_at <= start and job.state == "ok"
        query = next(r for r in trace.resources if r.trigger_id == job.async_id)
        assert trace.annotations_of(query.async_id)["rows"] == 1
    assert_plausible(trace)


def test_a_failing_thread_job_is_settled_as_error() -> None:
    def broken() -> None:
        raise OSError("disk")

    async def body() -> None:
        with pytest.raises(OSError, match="disk"):
            await asyncio.to_thread(broken)

    trace = traced(body)
    job = untimed(trace)[1]
    assert (job.type, job.state) == ("thread", "error")
    assert trace.annotations_of(2)["error"] == "OSError"


def test_a_coroutine_driven_from_a_thread_job_is_linked_to_that_job() -> None:
    async def on_loop() -> str:
        await asyncio.sleep(0.001)
        return "from loop"

    async def body() -> None:
        loop = asyncio.get_running_loop()

        def in_thread() -> str:
            return asyncio.run_coroutine_threadsafe(on_loop(), loop).result(5)

        assert await asyncio.to_thread(in_thread) == "from loop"

    trace = traced(body)
    assert tree(trace) == [("thread:in_thread", [("task:on_loop", [])])]
    assert_plausible(trace)


def test_anyio_from_thread_is_linked_to_the_worker_job() -> None:
    import anyio.from_thread
    import anyio.to_thread

    async def on_loop() -> str:
        await asyncio.sleep(0.001)
        return "from loop"

    def in_thread() -> str:
        return anyio.from_thread.run(on_loop)

    async def body() -> None:
        assert await anyio.to_thread.run_sync(in_thread) == "from loop"

    trace = traced(body)
    job = by_label(trace, "thread:in_thread")[0]
    bridged = [r for r in trace.resources if r.type == "task" and r.trigger_id == job.async_id]
    assert bridged and all(r.state == "ok" for r in bridged)
