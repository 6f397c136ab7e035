"""Tasks: the causality tree and step timings of each common async pattern (the factory and
TimedCoroutine that record them: test_task_factory)."""

from __future__ import annotations

import asyncio
import inspect
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from asgi_asynctrace import (
    Resource,
    Trace,
    annotate,
    current_resource,
    start_resource,
)
from tests.helpers import (
    NO_EAGER_TASKS,
    _request,
    assert_plausible,
    by_label,
    label,
    leaf,
    run,
    traced,
    tree,
    untimed,
)


def test_sequential_awaits_make_tasks_one_after_the_other() -> None:
    async def body() -> None:
        await asyncio.create_task(leaf())
        await asyncio.create_task(leaf())

    trace = traced(body)
    assert tree(trace) == [("task:leaf", []), ("task:leaf", [])]
    first, second = untimed(trace)[1:]
    assert first.settled_at is not None and first.settled_at <= second.created_at
    assert_plausible(trace)


def test_gather_runs_its_children_in_parallel() -> None:
    async def body() -> None:
        assert list(await asyncio.gather(leaf(0.02), leaf(0.02), leaf(0.02))) == ["leaf"] * 3

    trace = traced(body)
    assert tree(trace) == [("task:leaf", []), ("task:leaf", []), ("task:leaf", [])]
    tasks = untimed(trace)[1:]
    assert max(t.created_at for t in tasks) < min(t.settled_at or 0 for t in tasks)
    assert all(t.state == "ok" and len(t.callbacks) == 4 for t in tasks)  # two steps each
    assert_plausible(trace)


def test_a_race_with_wait_first_completed_leaves_the_loser_cancelled() -> None:
    async def body() -> None:
        fast, slow = asyncio.create_task(leaf(0.001)), asyncio.create_task(leaf(5))
        done, _ = await asyncio.wait({fast, slow}, return_when=asyncio.FIRST_COMPLETED)
        assert done == {fast}
        slow.cancel()
        await asyncio.gather(slow, return_exceptions=True)

    trace = traced(body)
    fast, slow = untimed(trace)[1:3]
    assert (fast.state, slow.state) == ("ok", "cancelled")
    assert slow.settled_at is not None and fast.settled_at is not None
    assert slow.settled_at > fast.settled_at
    assert_plausible(trace)


def test_as_completed_yields_each_child_as_it_settles() -> None:
    async def body() -> None:
        order = [await f for f in asyncio.as_completed([leaf(0.02), leaf(0.001)])]
        assert order == ["leaf", "leaf"]

    trace = traced(body)
    tasks = [r for r in trace.resources if label(trace, r) == "task:leaf"]
    assert [t.trigger_id for t in tasks] == [1, 1] and all(t.state == "ok" for t in tasks)
    # as_completed makes its tasks from a set, so their creation order is arbitrary
    first, last = sorted(tasks, key=lambda t: t.settled_at or 0)
    assert last.settled_at is not None and first.settled_at is not None
    # the 20 ms child settles last, at least 19 ms in (uvloop rounds timers to whole
    # milliseconds); how soon the 1 ms one settles is up to the machine's load
    assert last.settled_at - min(t.created_at for t in tasks) >= 19_000_000
    assert first.settled_at < last.settled_at
    assert_plausible(trace)


def test_nested_tasks_three_deep_form_a_chain() -> None:
    async def c() -> None:
        await asyncio.sleep(0.001)

    async def b() -> None:
        await asyncio.create_task(c())

    async def a() -> None:
        await asyncio.create_task(b())

    async def body() -> None:
        await asyncio.create_task(a())

    trace = traced(body)
    assert tree(trace) == [("task:a", [("task:b", [("task:c", [])])])]
    a_, b_, c_ = untimed(trace)[1:]
    assert a_.created_at < b_.created_at < c_.created_at
    assert c_.settled_at is not None and b_.settled_at is not None and a_.settled_at is not None
    assert c_.settled_at <= b_.settled_at <= a_.settled_at
    assert_plausible(trace)


def test_async_iteration_records_each_wait_of_the_generator_as_caused_by_its_consumer() -> None:
    async def numbers() -> AsyncIterator[int]:
        for i in range(3):
            await asyncio.sleep(0.001)
            yield i

    async def consume() -> None:
        assert [i async for i in numbers()] == [0, 1, 2]

    async def body() -> None:
        await asyncio.create_task(consume())

    trace = traced(body, futures=True)
    consumer = by_label(trace, "task:consume")[0]
    sleeps = [r for r in trace.resources if r.type == "timer"]
    assert len(sleeps) == 3
    assert all(s.trigger_id == consumer.async_id and s.state == "ok" for s in sleeps)
    assert len(consumer.callbacks) == 2 * 4  # one step to start, one after each sleep
    assert_plausible(trace)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="TaskGroup is new in Python 3.11")
def test_a_task_group_with_one_failing_child_cancels_its_siblings() -> None:
    async def fails() -> None:
        await asyncio.sleep(0.005)
        raise ValueError("bad input")

    async def body() -> None:
        with pytest.raises(Exception) as caught:  # an ExceptionGroup, new in 3.11 too
            async with asyncio.TaskGroup() as group:  # type: ignore[attr-defined,unused-ignore]
                group.create_task(leaf(5))
                group.create_task(fails())
                group.create_task(leaf(5))
        assert type(caught.value).__name__ == "ExceptionGroup"
        assert [type(e) for e in caught.value.exceptions] == [ValueError]  # type: ignore[attr-defined,unused-ignore]

    trace = traced(body)
    assert tree(trace) == [("task:leaf", []), ("task:fails", []), ("task:leaf", [])]
    states = [r.state for r in untimed(trace)[1:]]
    assert states == ["cancelled", "error", "cancelled"]
    assert trace.annotations_of(3)["error"] == "ValueError"
    assert_plausible(trace)


def test_shield_keeps_the_inner_task_running_when_the_outer_wait_is_cancelled() -> None:
    async def body() -> None:
        # Ordered by events, not by timers: on a loaded machine a 5 ms sleep can
        # outlast a 20 ms one that started earlier (CI saw exactly that).
        started, outer_done, release = asyncio.Event(), asyncio.Event(), asyncio.Event()

        async def protected() -> str:
            started.set()
            await release.wait()
            await asyncio.sleep(0.001)
            return "done"

        async def outer() -> None:
            try:
                await asyncio.shield(protected())
            finally:
                outer_done.set()

        task = asyncio.create_task(outer())
        await started.wait()
        task.cancel()
        await outer_done.wait()
        release.set()
        await asyncio.sleep(0.01)

    trace = traced(body)
    assert tree(trace) == [("task:outer", [("task:protected", [])])]
    outer, inner = untimed(trace)[1:]
    assert (outer.state, inner.state) == ("cancelled", "ok")
    assert outer.settled_at is not None and inner.settled_at is not None
    assert inner.settled_at > outer.settled_at
    assert_plausible(trace)


def test_wait_for_timing_out_cancels_the_awaited_task() -> None:
    async def body() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.create_task(leaf(5)), timeout=0.01)

    trace = traced(body)
    assert tree(trace) == [("task:leaf", [])]
    waited = untimed(trace)[1]
    assert waited.state == "cancelled"
    # cancelled at the 10 ms deadline (uvloop's timers fire on whole milliseconds: 9 ms and up)
    assert waited.settled_at is not None and waited.settled_at - waited.created_at >= 9_000_000
    assert_plausible(trace)


def test_cancelling_a_child_mid_request_records_the_cancellation_at_its_time() -> None:
    async def body() -> None:
        task = asyncio.create_task(leaf(5))
        await asyncio.sleep(0.01)
        before = time.perf_counter_ns()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        annotate("cancelled_after", before)

    trace = traced(body)
    task = untimed(trace)[1]
    assert task.state == "cancelled" and task.settled_at is not None
    assert task.settled_at >= int(trace.annotations_of(1)["cancelled_after"] or 0)
    assert len(task.callbacks) == 4  # the first step, and the step that received the cancel
    assert_plausible(trace)


def test_a_background_task_that_outlives_the_request_is_pending_in_its_trace() -> None:
    finished = asyncio.Event

    async def main() -> tuple[Trace, bytes, Resource]:
        done = finished()

        async def later() -> None:
            await asyncio.sleep(0.02)
            done.set()

        async def body() -> None:
            keep.append(asyncio.create_task(later()))

        keep: list[asyncio.Task[None]] = []
        trace = await _request(body)
        assert trace is not None
        emitted = trace.to_json()
        await done.wait()
        await asyncio.sleep(0)
        return trace, emitted, untimed(trace)[1]

    trace, emitted, task = run(main())
    assert task.state == "pending" and task.settled_at is None  # nothing recorded after the end
    assert trace.to_json() == emitted


def test_step_timing_keeps_task_introspection_working() -> None:
    seen: dict[str, Any] = {}

    async def worker() -> None:
        await asyncio.sleep(0.01)

    async def body() -> None:
        task = asyncio.create_task(worker(), name="the-worker")
        await asyncio.sleep(0.001)
        coro: Any = task.get_coro()
        seen["qualname"] = coro.__qualname__
        seen["name"] = coro.__name__
        seen["state"] = inspect.getcoroutinestate(coro)
        seen["frame"] = coro.cr_frame.f_code.co_name
        seen["awaiting"] = coro.cr_await is not None
        seen["stack"] = [f.f_code.co_name for f in task.get_stack()]
        seen["repr"] = repr(task)
        seen["task_name"] = task.get_name()
        seen["iscoroutine"] = asyncio.iscoroutine(coro)
        await task

    traced(body)
    assert seen["qualname"].endswith("worker") and seen["name"] == "worker"
    assert seen["state"] == inspect.CORO_SUSPENDED and seen["frame"] == "worker"
    assert seen["awaiting"] and seen["stack"] == ["worker"]
    assert "worker()" in seen["repr"] and seen["task_name"] == "the-worker"
    assert seen["iscoroutine"]


@pytest.mark.skipif(bool(NO_EAGER_TASKS), reason=NO_EAGER_TASKS)
def test_eager_tasks_have_their_first_step_recorded_at_creation() -> None:
    async def main() -> Trace | None:
        loop = asyncio.get_running_loop()
        loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined,unused-ignore]

        async def quick() -> int:
            return 1

        async def body() -> None:
            task = asyncio.create_task(quick())
            assert task.done()  # it ran to completion eagerly, inside create_task
            await asyncio.create_task(leaf())

        return await _request(body)

    trace = run(main())
    assert trace is not None
    quick, slow = untimed(trace)[1:3]
    assert quick.state == "ok" and len(quick.callbacks) == 2
    assert slow.state == "ok" and len(slow.callbacks) == 4


def test_concurrent_requests_each_see_only_their_own_resources() -> None:
    async def one(n: int, traced_request: bool) -> Trace | None:
        async def work() -> None:
            await asyncio.sleep(0.001 * (n % 7))
            annotate("request", n)

        async def body() -> None:
            annotate("request", n)
            await asyncio.gather(work(), asyncio.to_thread(annotate, "request", n))
            async with start_resource("cache-get", key=f"k{n}"):
                annotate("request", n)
                await asyncio.sleep(0)

        return await _request(body, traced=traced_request, futures=True)

    async def main() -> list[Trace | None]:
        return await asyncio.gather(*(one(n, n % 2 == 0) for n in range(200)))

    results = run(main())
    assert all(results[n] is None for n in range(1, 200, 2))
    for n in range(0, 200, 2):
        trace = results[n]
        assert trace is not None
        labels = {v for _, k, v in trace.annotations if k == "request"}
        keys = {v for _, k, v in trace.annotations if k == "key"}
        assert labels == {n} and keys == {f"k{n}"}
        assert tree(trace, types=frozenset({"task", "thread", "cache-get"})) == [
            ("task:work", []),
            ("task:to_thread", [("thread:annotate", [])]),
            ("cache-get", []),
        ]
        assert sum(1 for _, k, _ in trace.annotations if k == "request") == 4


def test_the_current_resource_inside_a_task_is_that_task() -> None:
    seen: list[Any] = []

    async def child() -> None:
        seen.append(current_resource())

    async def body() -> None:
        await asyncio.create_task(child())

    trace = traced(body)
    assert seen == [untimed(trace)[1]]


def test_anyio_task_groups_record_their_children() -> None:
    import anyio

    async def child(delay: float) -> None:
        await anyio.sleep(delay)
        annotate("delay", delay)

    async def body() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(child, 0.001)
            group.start_soon(child, 0.002)

    trace = traced(body)
    tasks = [r for r in trace.resources if r.type == "task"]
    assert len(tasks) == 2 and all(t.trigger_id == 1 and t.state == "ok" for t in tasks)
    assert sorted(trace.annotations_of(t.async_id)["delay"] or 0 for t in tasks) == [0.001, 0.002]
    assert_plausible(trace)
