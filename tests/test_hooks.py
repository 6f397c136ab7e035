"""The asyncio hooks: the causality tree and step timings of each common async pattern."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import inspect
import sys
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest

from asgi_asynctrace import (
    Resource,
    Trace,
    _futures,
    _hooks,
    _loop_methods,
    _tasks,
    annotate,
    current_resource,
    start_resource,
)
from tests.helpers import (
    LOOP,
    NO_EAGER_TASKS,
    Recorded,
    _request,
    assert_recorded_alike,
    run,
    traced,
)

Tree = list[tuple[str, list[Any]]]
OWN_SUITES = frozenset({"timer", "stream-read", "stream-write"})


def label(trace: Trace, res: Resource) -> str:
    notes = trace.annotations_of(res.async_id)
    name = notes.get("coroutine") or notes.get("function") or notes.get("name")
    short = str(name).rsplit(".", 1)[-1] if name else ""
    return f"{res.type}:{short}" if short else res.type


def tree(trace: Trace, parent: int = 1, types: frozenset[str] | None = None) -> Tree:
    """The causality tree under ``parent`` as nested (label, children), in creation order.

    Timers (from the timers instrumentation, on by default) and the response body the
    middleware records are left out unless asked for: their own suites are
    tests/instrumentation/test_timers.py and tests/test_streams.py.
    """
    return [
        (label(trace, r), tree(trace, r.async_id, types))
        for r in trace.resources
        if r.trigger_id == parent and (r.type in types if types else r.type not in OWN_SUITES)
    ]


def untimed(trace: Trace) -> list[Resource]:
    """The trace's resources without its timers and body streams (see ``tree``)."""
    return [r for r in trace.resources if r.type not in OWN_SUITES]


def by_label(trace: Trace, wanted: str) -> list[Resource]:
    return [r for r in trace.resources if label(trace, r) == wanted]


def assert_plausible(trace: Trace) -> None:
    """Every resource's times are ordered: created <= steps (ordered, disjoint) <= settled."""
    end = trace.ended_at
    assert end is not None
    for r in trace.resources:
        times = r.callbacks
        assert times == sorted(times), r
        if times:
            assert r.created_at <= times[0], r
        if r.settled_at is not None:
            assert r.created_at <= r.settled_at, r
            if times and r.type in ("task", "thread"):
                assert times[-1] <= r.settled_at, r
        assert r.trigger_id < r.async_id


async def leaf(delay: float = 0.005) -> str:
    await asyncio.sleep(delay)
    return "leaf"


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
    futures = [r for r in trace.resources if r.type == "future"]
    assert len(futures) == 3
    assert all(f.trigger_id == consumer.async_id for f in futures)
    assert all(f.awaited_by == [consumer.async_id] and f.state == "ok" for f in futures)
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


def test_futures_record_who_made_them_who_waited_and_when_they_settled() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        loop.call_later(0.005, fut.set_result, 1)
        assert await fut == 1
        lock = asyncio.Event()
        waiter = asyncio.create_task(lock.wait())
        await asyncio.sleep(0.001)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)

    trace = traced(body, futures=True)
    made, *rest = [r for r in trace.resources if r.type == "future"]
    assert made.trigger_id == 1 and made.awaited_by == [1] and made.state == "ok"
    event_future = next(r for r in rest if r.trigger_id != 1)
    assert event_future.state == "cancelled"
    assert_plausible(trace)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout is new in Python 3.11")
def test_asyncio_timeout_cancels_the_wait_inside_it() -> None:
    async def body() -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.005):  # type: ignore[attr-defined,unused-ignore]
                await asyncio.sleep(5)

    trace = traced(body, futures=True)
    (sleep,) = [r for r in trace.resources if r.type == "future"]
    assert sleep.state == "cancelled" and sleep.trigger_id == 1


def test_hooks_are_on_only_while_a_traced_request_runs() -> None:
    states: dict[str, Any] = {}
    original_submit = concurrent.futures.ThreadPoolExecutor.submit

    def patched(loop: asyncio.AbstractEventLoop) -> bool:
        return "create_future" in type(loop).__dict__

    async def body() -> None:
        loop = asyncio.get_running_loop()
        states["traced" if current_resource() else "untraced"] = (
            loop.get_task_factory() is not None,
            patched(loop),
            concurrent.futures.ThreadPoolExecutor.submit is not original_submit,
        )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        states["before"] = (loop.get_task_factory(), patched(loop))
        await _request(body, linger=0)  # off the moment the traced request ends
        await _request(body, traced=False)
        states["after"] = (loop.get_task_factory(), patched(loop))

    run(main())
    assert states["before"] == states["after"] == (None, False)
    assert states["traced"] == (True, True, True)
    assert states["untraced"] == (False, False, False)
    assert concurrent.futures.ThreadPoolExecutor.submit is original_submit


@pytest.mark.skipif(_tasks._CDispatch is None, reason="the C accelerator is not built")
def test_by_default_hooks_stay_on_as_c_pass_throughs_until_uninstalled() -> None:
    """Taking the hooks off and on again makes CPython re-learn the loop's lookups; left on,
    each patched method outside a traced request is the C dispatcher calling the original."""
    from asgi_asynctrace import _speedups, uninstall_hooks

    original_submit = concurrent.futures.ThreadPoolExecutor.submit
    seen: dict[str, Any] = {}

    async def body() -> None:
        await asyncio.sleep(0)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await _request(body)  # the default linger
        patch = type(loop).__dict__.get("create_future")
        submit = concurrent.futures.ThreadPoolExecutor.submit
        seen["after"] = (loop.get_task_factory() is not None, type(patch), type(submit))
        seen["submit untraced side"] = getattr(submit, "untraced", None)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # untraced: the executor's own
            seen["ran"] = pool.submit(lambda: 7).result()
        seen["future"] = type(loop.create_future())
        trace = await _request(body)  # the same hooks serve the next traced request
        seen["traced again"] = trace is not None and trace.root.state == "ok"
        uninstall_hooks()
        seen["uninstalled"] = (
            loop.get_task_factory(),
            "create_future" in type(loop).__dict__,
            concurrent.futures.ThreadPoolExecutor.submit is original_submit,
        )

    run(main())
    assert seen["after"] == (True, _speedups.Dispatch, _speedups.Dispatch)
    assert seen["submit untraced side"] is original_submit
    assert seen["ran"] == 7 and seen["future"] is asyncio.Future
    assert seen["traced again"]
    assert seen["uninstalled"] == (None, False, True)


def test_hooks_linger_after_the_last_traced_request_then_come_off() -> None:
    """Taking the hooks off and on changes the loop's class, which costs every request far
    more than leaving them on: they stay ``hooks_linger`` seconds for the next traced one."""

    async def body() -> None:
        await asyncio.sleep(0)

    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()

        def state() -> tuple[bool, bool]:
            return loop.get_task_factory() is not None, "create_future" in type(loop).__dict__

        seen: list[Any] = []
        await _request(body, linger=0.2)
        seen.append(state())  # lingering
        first = _hooks._loops[loop].held.on_since
        await asyncio.sleep(0.05)
        await _request(body, linger=0.2)  # within the linger: the same hooks, not new ones
        seen.append(_hooks._loops[loop].held.on_since == first)
        await asyncio.sleep(0.1)
        seen.append(state())  # 0.1 s after the second request: still on
        await asyncio.sleep(0.3)
        seen.append(state())  # its linger has passed
        return seen

    assert run(main()) == [(True, True), True, (True, True), (False, False)]


def test_a_loop_closed_while_its_hooks_linger_takes_them_off() -> None:
    async def body() -> None:
        await asyncio.sleep(0)

    loops: list[asyncio.AbstractEventLoop] = []
    before: dict[str, Any] = {}

    async def main() -> bool:
        loops.append(asyncio.get_running_loop())
        before.update(type(loops[0]).__dict__)
        await _request(body, linger=60)
        return "create_future" in type(loops[0]).__dict__

    assert run(main()) is True  # on when the request ended, and run() closed the loop
    assert loops[0].is_closed()
    assert dict(type(loops[0]).__dict__) == before  # the class exactly as it was


def test_loops_in_two_threads_share_the_class_patches_and_give_them_back() -> None:
    """Each thread's loop traces its own requests; the class is left exactly as it was."""
    import threading

    traces: list[Trace | None] = []
    classes: list[type] = []
    before: dict[str, Any] = {}
    ready = threading.Barrier(2)

    def worker(label: str) -> None:
        async def body() -> None:
            for _ in range(10):
                await asyncio.gather(leaf(0.001), leaf(0.001))

        async def main() -> Trace | None:
            classes.append(type(asyncio.get_running_loop()))
            if not before:
                before.update(classes[0].__dict__)
            ready.wait(5)  # both loops are running: their requests overlap
            return await _request(body, linger=0.01)

        traces.append(run(main()))

    threads = [threading.Thread(target=worker, args=(name,)) for name in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(traces) == 2 and all(t is not None for t in traces)
    for trace in traces:
        assert trace is not None
        assert sum(r.type == "task" for r in trace.resources) == 20
    assert classes[0] is classes[1]
    assert dict(classes[0].__dict__) == before


def test_hooks_leave_the_loops_own_attributes_alone() -> None:
    """The hooks patch the loop's class, never the loop: on CPython 3.11+ an object whose
    ``__dict__`` was once asked for keeps a slower attribute lookup for the rest of its life,
    and every loop method call would pay for it after the first traced request."""

    async def body() -> None:
        await asyncio.sleep(0.001)
        await asyncio.gather(leaf(), leaf())

    async def main() -> tuple[bool, bool, list[str]]:
        loop = asyncio.get_running_loop()

        def materialized() -> bool:  # the loop's namespace exists as a dict object of its own
            return any(type(r) is dict and "_ready" in r for r in gc.get_referents(loop))

        before = materialized()
        trace = await _request(body, futures=True)
        assert trace is not None
        return before, materialized(), sorted({r.type for r in trace.resources})

    before, after, types = run(main())
    assert {"future", "task", "timer"} <= set(types)  # the hooks did their work
    if sys.version_info >= (3, 11):
        assert not before and not after


def test_the_time_hooks_are_on_is_counted_while_traced_requests_run_and_only_then() -> None:
    from asgi_asynctrace._hooks import hooks_on_ns

    async def body() -> None:
        await asyncio.sleep(0.02)

    async def main() -> tuple[int, int, int, int]:
        start = hooks_on_ns()
        await _request(body, traced=False)
        untraced = hooks_on_ns()
        task = asyncio.create_task(_request(body))
        await asyncio.sleep(0.01)
        during = hooks_on_ns()  # the request is in flight: its open interval counts
        await task
        return start, untraced, during, hooks_on_ns()

    start, untraced, during, after = run(main())
    assert untraced == start
    assert start < during < after
    # the traced request's sleep, at least (less a millisecond: uvloop's timers are libuv's,
    # whose clock is read in whole milliseconds and cached, so a 20 ms sleep can end early)
    assert after - start >= 19_000_000


def test_a_task_factory_already_on_the_loop_is_chained_and_restored() -> None:
    made: list[str] = []

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        made.append(coro.__qualname__)
        return asyncio.Task(coro, loop=loop, **kwargs)

    async def main() -> Trace | None:
        loop = asyncio.get_running_loop()
        loop.set_task_factory(factory)

        async def body() -> None:
            await asyncio.create_task(leaf())

        trace = await _request(body, linger=0)
        assert loop.get_task_factory() is factory
        return trace

    trace = run(main())
    assert trace is not None and tree(trace) == [("task:leaf", [])]
    assert any(name.endswith("leaf") for name in made)


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


def test_the_loop_under_test_is_the_one_asked_for() -> None:
    async def main() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert run(main()).startswith("uvloop" if LOOP == "uvloop" else "asyncio")


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


# -- the loop methods the hooks replace: C and Python give the same calls ---------------------


def _dispatchers() -> list[Any]:

    found = [_tasks.dispatch_python]
    if _tasks._CDispatch is not None:
        found.append(_tasks.dispatch)
    return found


@pytest.mark.parametrize("make", _dispatchers())
def test_dispatch_calls_the_untraced_side_outside_a_trace_and_the_traced_side_inside(
    make: Any,
) -> None:
    from asgi_asynctrace._context import ACTIVE

    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def untraced(*args: Any, **kwargs: Any) -> str:
        calls.append(("untraced", args, kwargs))
        return "u"

    def traced_side(*args: Any, **kwargs: Any) -> str:
        if kwargs.get("fail"):
            raise KeyError("passed through")
        calls.append(("traced", args, kwargs))
        return "t"

    both = make(untraced, traced_side)
    assert both(1, 2, key="v") == "u"
    trace = Trace.start()
    token = ACTIVE.set((trace, trace.root))
    try:
        assert both(3, key="w") == "t"
        with pytest.raises(KeyError, match="passed through"):
            both(fail=True)
    finally:
        ACTIVE.reset(token)
    assert calls == [("untraced", (1, 2), {"key": "v"}), ("traced", (3,), {"key": "w"})]


@pytest.mark.parametrize("make", _dispatchers())
def test_dispatch_put_in_a_class_is_a_method_of_its_instances(make: Any) -> None:
    """The hooks put it on loop classes: the loop arrives first, however it is called."""
    from asgi_asynctrace._context import ACTIVE

    class Loop:
        def ping(self, x: int, *, key: str = "") -> tuple[str, Any, int, str]:
            return ("untraced", self, x, key)

    def traced_side(self: Any, x: int, *, key: str = "") -> tuple[str, Any, int, str]:
        return ("traced", self, x, key)

    Loop.ping = make(Loop.__dict__["ping"], traced_side)  # type: ignore[method-assign]
    loop = Loop()
    bound = loop.ping  # an attribute read binds as a method does
    assert loop.ping(1, key="k") == bound(1, key="k") == ("untraced", loop, 1, "k")
    trace = Trace.start()
    token = ACTIVE.set((trace, trace.root))
    try:
        assert loop.ping(2) == bound(2) == ("traced", loop, 2, "")
    finally:
        ACTIVE.reset(token)
    assert Loop.__dict__["ping"].__get__(None, Loop) is Loop.__dict__["ping"]


def test_the_untraced_task_factory_makes_the_task_asyncio_would(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import contextvars

    seen = contextvars.ContextVar("seen", default="outside")
    with_context = sys.version_info >= (3, 11)  # Task(context=...) is new in 3.11

    async def body() -> str:
        return seen.get()

    async def main(factory: Any) -> list[Any]:
        loop = asyncio.get_running_loop()
        plain = factory(loop, body())
        context = contextvars.copy_context()
        context.run(seen.set, "inside")
        extra = {"context": context} if with_context else {}
        named = factory(loop, body(), name="named", **extra)
        return [type(plain), await plain, await named, named.get_name()]

    accelerated = run(main(_tasks._plain_factory()))
    monkeypatch.setattr(_tasks, "_CTaskCall", None)
    python = run(main(_tasks._plain_factory()))
    inside = "inside" if with_context else "outside"
    assert accelerated == python == [asyncio.Task, "outside", inside, "named"]


def test_without_the_accelerator_the_hooks_record_the_same_resources(
    monkeypatch: pytest.MonkeyPatch,
) -> None:

    async def body() -> None:
        await asyncio.gather(asyncio.sleep(0.001), asyncio.create_task(asyncio.sleep(0)))
        await asyncio.wait_for(asyncio.sleep(0), timeout=1)

    def shape(trace: Trace) -> list[tuple[str, int, str]]:
        return [(r.type, r.trigger_id, r.state) for r in trace.resources]

    accelerated = traced(body, futures=True)
    monkeypatch.setattr(_tasks, "_CDispatch", None)
    monkeypatch.setattr(_tasks, "_CTaskCall", None)
    assert shape(traced(body, futures=True)) == shape(accelerated)
    assert {"task", "future", "timer"} <= {r.type for r in accelerated.resources}


def test_while_hooks_are_on_an_untraced_create_future_is_asyncios_own() -> None:
    """The untraced side of the create_future patch may be C doing what asyncio's does: the
    future must be the very same kind, on the same loop, and behave the same."""

    async def main() -> tuple[Any, ...]:
        loop = asyncio.get_running_loop()
        plain = loop.create_future()
        release = _hooks.acquire_hooks(loop, 0)
        try:
            patched = "create_future" in type(loop).__dict__
            fut = loop.create_future()
            loop.call_soon(fut.set_result, 7)
            value = await fut
        finally:
            release()
        return patched, type(fut), type(plain), fut.get_loop() is loop, value

    patched, kind, plain_kind, same_loop, value = run(main())
    assert patched and kind is plain_kind and same_loop and value == 7


# -- the C task factory and TimedCoroutine against their Python forms -------------------------


async def _gathered() -> None:
    async def child(n: int) -> int:
        await asyncio.sleep(0)
        return n

    await asyncio.gather(child(1), child(2))


async def _raced() -> None:
    fast = asyncio.ensure_future(asyncio.sleep(0))
    slow = asyncio.ensure_future(asyncio.sleep(5))
    await asyncio.wait([fast, slow], return_when=asyncio.FIRST_COMPLETED)
    slow.cancel()
    await asyncio.gather(slow, return_exceptions=True)


async def _failed() -> None:
    async def broken() -> None:
        await asyncio.sleep(0)
        raise ValueError("no")

    await asyncio.gather(broken(), return_exceptions=True)


async def _nested_with_a_future() -> None:
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    async def setter() -> None:
        await asyncio.sleep(0)
        fut.set_result(1)

    async def waiter() -> int:
        return await fut  # type: ignore[no-any-return]

    async def outer() -> None:
        await asyncio.gather(asyncio.create_task(waiter()), asyncio.create_task(setter()))

    await asyncio.create_task(outer())


async def _with_a_context() -> None:
    import contextvars

    async def child() -> None:
        annotate("inside", "yes")
        await asyncio.sleep(0)

    if sys.version_info >= (3, 11):
        await asyncio.create_task(child(), context=contextvars.copy_context())
    else:
        await asyncio.create_task(child())


def _shape(trace: Trace) -> Recorded:
    """What both forms must record alike: every resource's place, state, steps, waiters and
    annotations (less the timing ones), and its creation stack."""
    stacks = trace.stacks
    return [
        (
            (
                r.type,
                r.trigger_id,
                r.state,
                len(r.callbacks),
                r.awaited_by,
                sorted(
                    (k, v)
                    for k, v in trace.annotations_of(r.async_id).items()
                    if k not in ("lateMs", "responseStartedAt")
                ),
            ),
            stacks[r.stack_id] if r.stack_id is not None else None,
        )
        for r in trace.resources
    ]


@pytest.mark.skipif(_tasks._CTaskFactory is None, reason="the C accelerator is not built")
async def _futures_every_way() -> None:
    loop = asyncio.get_running_loop()
    done, failed, dropped, kept = (loop.create_future() for _ in range(4))

    async def waiter(fut: asyncio.Future[Any]) -> None:
        with contextlib.suppress(BaseException):
            await fut

    waiting = [asyncio.create_task(waiter(f)) for f in (done, failed, dropped)]
    await asyncio.sleep(0)
    done.set_result(1)
    failed.set_exception(KeyError("no"))
    assert dropped.cancel() and not done.cancel()  # a settled future's cancel does not count
    kept.set_result(2)
    await asyncio.gather(*waiting)


@pytest.mark.parametrize(
    "body",
    [_gathered, _raced, _failed, _nested_with_a_future, _with_a_context, _futures_every_way],
)
def test_the_c_task_factory_and_timed_coroutine_record_what_the_python_ones_do(
    body: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asgi_asynctrace import _middleware, failure_counts

    made = []
    for form in ("c", "python"):
        if form == "python":
            monkeypatch.setattr(_tasks, "TimedCoroutine", _tasks.PyTimedCoroutine)
            monkeypatch.setattr(_middleware, "TimedCoroutine", _tasks.PyTimedCoroutine)
            monkeypatch.setattr(_tasks, "_last_factory", None)  # made again, in Python
            monkeypatch.setattr(_futures, "_python_futures", True)
            monkeypatch.setattr(_loop_methods, "_made", {})  # the loop's create_future too
            for name, method in _futures.PY_FUTURE_METHODS.items():
                monkeypatch.setattr(_futures.TracedFuture, name, method)
        made.append(traced(body, futures=True))
    monkeypatch.undo()
    _tasks._last_factory = None
    c_trace, python_trace = made
    assert any(r.type == "task" for r in c_trace.resources)
    assert_recorded_alike(_shape(c_trace), _shape(python_trace))
    assert failure_counts() == {}
    assert_plausible(c_trace)


def _timed_forms() -> list[Any]:
    forms = [_tasks.PyTimedCoroutine]
    if _tasks.TimedCoroutine is not _tasks.PyTimedCoroutine:
        forms.append(_tasks.TimedCoroutine)
    return forms


class _Step:
    def __await__(self) -> Any:
        yield None


@pytest.mark.parametrize("form", _timed_forms())
def test_timed_coroutine_driven_by_hand_records_steps_caps_and_how_it_ended(form: Any) -> None:
    from asgi_asynctrace import TraceLimits

    async def steps(n: int, fail: BaseException | None = None) -> int:
        for _ in range(n):
            await _Step()
        if fail is not None:
            raise fail
        return n

    trace = Trace.start(limits=TraceLimits(max_callbacks_per_resource=3))

    def made(coro: Any) -> tuple[Any, Resource]:
        res = trace.new_resource("task", trace.root, 0)
        assert res is not None
        return form(coro, trace, res), res

    timed, res = made(steps(5))
    assert timed.__await__() is timed and iter(timed) is timed
    assert timed.cr_frame is not None and timed.__qualname__.endswith("steps")
    assert repr(timed).startswith("<coroutine object")
    for _ in range(5):
        assert timed.send(None) is None
    with pytest.raises(StopIteration) as stop:
        next(timed)
    assert stop.value.value == 5
    assert (len(res.callbacks), res.state) == (6, "ok")  # 3 steps of 6 kept, 3 dropped
    assert trace.dropped.callbacks == 3
    assert all(a <= b for a, b in zip(res.callbacks, res.callbacks[1:], strict=False))

    timed, res = made(steps(1, ValueError("no")))
    timed.send(None)
    with pytest.raises(ValueError, match="no"):
        timed.send(None)
    assert res.state == "error" and trace.annotations_of(res.async_id)["error"] == "ValueError"

    timed, res = made(steps(3))
    timed.send(None)
    with pytest.raises(asyncio.CancelledError):
        timed.throw(asyncio.CancelledError())
    assert res.state == "cancelled" and len(res.callbacks) == 4

    timed, res = made(steps(3))
    timed.send(None)
    timed.close()
    assert timed.cr_frame is None

    timed, res = made(steps(2))
    trace.closed = True  # after the request: passes through, records nothing
    timed.send(None)
    assert res.callbacks == [] and res.state == "pending"
    trace.closed = False


@pytest.mark.skipif(_tasks.TimedCoroutine is _tasks.PyTimedCoroutine, reason="no C build")
def test_the_c_timed_coroutine_takes_only_a_recording_core_trace() -> None:
    trace = Trace.start()
    coro = _gathered()
    with pytest.raises(TypeError):
        _tasks.TimedCoroutine(coro, cast(Any, object()), trace.root)
    with pytest.raises(TypeError):
        _tasks.TimedCoroutine(coro, trace, cast(Any, object()))
    coro.close()
