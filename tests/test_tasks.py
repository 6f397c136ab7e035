"""Tasks: the causality tree and step timings of each common async pattern, the task
factory and TimedCoroutine (in C and in Python)."""

from __future__ import annotations

import asyncio
import contextlib
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
    _loop_methods,
    _tasks,
    annotate,
    current_resource,
    start_resource,
)
from tests.helpers import (
    NO_EAGER_TASKS,
    Recorded,
    _request,
    assert_plausible,
    assert_recorded_alike,
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


@pytest.mark.skipif(_tasks._CTaskFactory is None, reason="the C accelerator is not built")
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
