"""The task factory and TimedCoroutine that record tasks: the dispatchers, the untraced
factory making the task asyncio would, the C forms against the Python ones."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Any, cast

import pytest

from asgi_asynctrace import (
    Resource,
    Trace,
    _futures,
    _loop_methods,
    _tasks,
    annotate,
)
from tests.helpers import (
    Recorded,
    assert_plausible,
    assert_recorded_alike,
    run,
    traced,
)


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
