"""asyncio timers as ``timer`` resources, on asyncio's loop and on uvloop (ASYNCTRACE_TEST_LOOP)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import math
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asgi_asynctrace import Resource, Trace, annotate, instrument, uninstrument
from tests.helpers import LOOP, Recorded, _request, assert_recorded_alike, run, traced


@pytest.fixture(autouse=True)
def _timers_on() -> Iterator[None]:
    assert instrument("timers") == {"timers": True}
    yield
    instrument("timers")  # a test that turned them off leaves them on for the rest


def timers(trace: Trace) -> list[Resource]:
    return [r for r in trace.resources if r.type == "timer"]


def notes(trace: Trace, res: Resource) -> dict[str, Any]:
    return trace.annotations_of(res.async_id)


def test_a_sleep_is_a_timer_made_by_the_sleeping_task_with_its_delay_and_lateness() -> None:
    async def nap() -> None:
        await asyncio.sleep(0.02)

    async def body() -> None:
        await asyncio.create_task(nap())

    trace = traced(body)
    (task,) = [r for r in trace.resources if r.type == "task"]
    (timer,) = timers(trace)
    assert timer.trigger_id == task.async_id
    info = notes(trace, timer)
    assert info["kind"] == "sleep" and info["delayMs"] == 20.0
    assert 0 <= info["lateMs"] < 1000
    assert timer.state == "ok"
    ((start, end),) = timer.intervals()
    assert end is not None and timer.settled_at is not None
    assert start - timer.created_at >= 19_000_000  # it fired after its delay, not before
    assert timer.created_at <= start <= end <= timer.settled_at
    # its stack starts where it was asked for: asyncio.sleep, then the app's coroutine
    frames = trace.stacks[timer.stack_id] if timer.stack_id is not None else ()
    assert frames[0].startswith("sleep @ <stdlib>/asyncio/tasks.py")
    assert frames[1].split(" @ ")[0].endswith("nap")  # 3.10 has no qualified names
    assert " @ tests/instrumentation/test_timers.py:" in frames[1]


def test_sleep_zero_schedules_no_timer() -> None:
    async def body() -> None:
        await asyncio.sleep(0)

    assert timers(traced(body)) == []


def test_a_sleep_whose_task_is_cancelled_is_a_cancelled_timer() -> None:
    async def body() -> None:
        task = asyncio.create_task(asyncio.sleep(10))
        await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    trace = traced(body)
    (timer,) = [t for t in timers(trace) if notes(trace, t)["delayMs"] == 10_000]
    assert timer.state == "cancelled"
    assert timer.callbacks == []
    assert timer.settled_at is not None and trace.ended_at is not None
    assert timer.settled_at < trace.ended_at


@pytest.mark.parametrize("where", ["task", "request", "another task"])
def test_a_cancel_is_recorded_when_it_happens_on_either_loop(where: str) -> None:
    """On asyncio's loops the handle reports its cancel; uvloop's cannot, and there the step
    that cancelled it is seen to have done so as it ends (not when the request ends): a step
    of the task that made the timer, or any step of the request itself."""
    marks: dict[str, int] = {}
    made: list[asyncio.TimerHandle] = []

    async def make() -> None:
        made.append(asyncio.get_running_loop().call_later(10, print))

    async def cancel() -> None:
        made[0].cancel()

    async def body() -> None:
        if where == "another task":  # made by one, cancelled by another (an expiry, a delete)
            await asyncio.create_task(make())
            await asyncio.sleep(0.01)
            marks["before"] = time.perf_counter_ns()
            await asyncio.create_task(cancel())
        elif where == "task":  # a sleep's own timer, cancelled in its task's last step
            task = asyncio.create_task(asyncio.sleep(10))
            await asyncio.sleep(0.01)
            marks["before"] = time.perf_counter_ns()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        else:  # the request's own call_later, cancelled in one of its steps
            handle = asyncio.get_running_loop().call_later(10, print)
            await asyncio.sleep(0.01)
            marks["before"] = time.perf_counter_ns()
            handle.cancel()
            await asyncio.sleep(0)
        marks["after"] = time.perf_counter_ns()
        await asyncio.sleep(0.03)  # the request goes on well after the cancel

    trace = traced(body)
    (timer,) = [t for t in timers(trace) if notes(trace, t)["delayMs"] == 10_000]
    assert timer.state == "cancelled"
    assert timer.settled_at is not None and trace.ended_at is not None
    assert marks["before"] <= timer.settled_at < trace.ended_at - 25_000_000
    if where != "another task" or LOOP == "asyncio":  # else seen as the request's step ends
        assert timer.settled_at <= marks["after"]
    assert not trace._watched  # let go when the request ended


def test_a_traced_timers_handle_is_still_asyncios_timer_handle() -> None:
    handles: list[Any] = []

    async def body() -> None:
        loop = asyncio.get_running_loop()
        handles.append(loop.call_later(10, print))
        handles[0].cancel()

    async def main() -> Trace | None:
        trace = await _request(body)
        handles.append(asyncio.get_running_loop().call_later(10, print))  # untraced
        handles[1].cancel()
        return trace

    trace = run(main())
    assert trace is not None
    (timer,) = timers(trace)
    assert timer.state == "cancelled"
    traced_handle, plain = handles
    assert isinstance(traced_handle, type(plain)) and traced_handle.cancelled()
    assert repr(traced_handle).startswith(f"<{type(plain).__name__} cancelled")
    if LOOP == "asyncio":  # the untraced one is exactly asyncio's; only traced ones record
        assert type(plain) is asyncio.TimerHandle


@pytest.mark.skipif(LOOP != "asyncio", reason="uvloop's handles keep their class")
def test_many_traced_timer_handles_leave_both_handle_classes_as_many_references_as_before() -> None:
    # After CPython has checked the first one, the C side swaps a handle's class itself: each
    # swap must move one reference from asyncio's class to the traced one, and each handle's
    # end give it back (a reference too few would free a class in use, one too many leak it).
    from instrumentation.timers import _TracedTimerHandle

    async def body() -> None:
        loop = asyncio.get_running_loop()
        for _ in range(200):
            loop.call_later(10, print).cancel()

    traced(body)  # the first swaps, checked by CPython
    before = sys.getrefcount(asyncio.TimerHandle), sys.getrefcount(_TracedTimerHandle)
    trace = traced(body)
    assert len(timers(trace)) == 200 and all(t.state == "cancelled" for t in timers(trace))
    del trace
    assert (sys.getrefcount(asyncio.TimerHandle), sys.getrefcount(_TracedTimerHandle)) == before


def test_a_wait_for_deadline_that_is_not_reached_is_cancelled_and_one_that_is_fires() -> None:
    async def body() -> None:
        await asyncio.wait_for(asyncio.sleep(0.001), timeout=5)
        # started before its deadline is set: uvloop runs due timers before the ready
        # callbacks, so on a loaded machine a 10 ms deadline could fire first
        sleeping = asyncio.ensure_future(asyncio.sleep(5))
        await asyncio.sleep(0)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(sleeping, timeout=0.01)

    trace = traced(body)
    kind = "timeout" if sys.version_info >= (3, 12) else "wait_for"
    deadlines = [t for t in timers(trace) if notes(trace, t)["kind"] == kind]
    delays = [notes(trace, t)["delayMs"] for t in deadlines]
    assert delays == [pytest.approx(5000, abs=5), pytest.approx(10, abs=5)]
    assert [t.state for t in deadlines] == ["cancelled", "ok"]
    sleeps = [t for t in timers(trace) if notes(trace, t)["kind"] == "sleep"]
    assert [t.state for t in sleeps] == ["ok", "cancelled"]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout is new in Python 3.11")
def test_an_asyncio_timeout_deadline_is_a_timer() -> None:
    async def body() -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.01):  # type: ignore[attr-defined,unused-ignore]
                await asyncio.sleep(1)

    trace = traced(body)
    (deadline,) = [t for t in timers(trace) if notes(trace, t)["kind"] == "timeout"]
    assert deadline.state == "ok" and len(deadline.callbacks) == 2


def test_call_later_runs_its_callback_as_the_timers_step_and_records_what_it_does() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        fired = loop.create_future()

        def ring(value: str) -> None:
            annotate("rang", value)
            fired.set_result(value)

        loop.call_later(0.005, ring, "once")
        loop.call_at(loop.time() + 0.01, ring, "twice")  # a second set_result: raises
        await fired
        await asyncio.sleep(0.02)

    errors: list[dict[str, Any]] = []

    async def main() -> Trace:
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
        trace = await _request(body)
        assert trace is not None
        return trace

    trace = run(main())
    later, at = [t for t in timers(trace) if notes(trace, t)["kind"] in ("call_later", "call_at")]
    assert notes(trace, later)["callback"].endswith("ring")
    assert notes(trace, later)["rang"] == "once"  # annotate() inside lands on the timer
    assert later.state == "ok" and len(later.callbacks) == 2
    assert notes(trace, at)["kind"] == "call_at"
    assert at.state == "error" and notes(trace, at)["error"] == "InvalidStateError"
    assert len(errors) == 1  # the loop's exception handler still got the error, as ever
    assert notes(trace, later)["delayMs"] == 5.0  # exactly as asked
    for timer, line in ((later, "loop.call_later("), (at, "loop.call_at(")):
        # each stack starts at the line that scheduled it, whichever way the loop recorded it
        assert timer.stack_id is not None
        first = trace.stacks[timer.stack_id][0]
        assert first.split(" @ ")[0].endswith("body")  # (a qualified name from 3.11 on)
        lineno = int(first.rsplit(":", 2)[1])
        assert line in Path(__file__).read_text().splitlines()[lineno - 1]


def test_a_blocked_loop_shows_as_lateness() -> None:
    async def body() -> None:
        sleeper = asyncio.create_task(asyncio.sleep(0.005))
        await asyncio.sleep(0)
        time.sleep(0.06)  # blocks the loop past the timer's due time
        await sleeper

    trace = traced(body)
    (timer,) = [t for t in timers(trace) if notes(trace, t)["delayMs"] == 5.0]
    assert notes(trace, timer)["lateMs"] >= 40


def test_untraced_code_and_ended_requests_leave_the_loop_untouched() -> None:
    async def body() -> None:
        await asyncio.sleep(0.001)

    async def main() -> tuple[Any, set[str], Trace | None]:
        loop = asyncio.get_running_loop()
        handle = loop.call_later(10, print)  # outside any request: the loop's own method
        callback = getattr(handle, "_callback", print)
        handle.cancel()
        trace = await _request(body)
        return callback, set(getattr(loop, "__dict__", {})), trace

    callback, patched, trace = run(main())
    assert callback is print
    assert not {"call_later", "call_at", "_timer_handle_cancelled"} & patched
    assert trace is not None and len(timers(trace)) == 1


def test_uninstrument_stops_recording_timers() -> None:
    uninstrument("timers")

    async def body() -> None:
        await asyncio.sleep(0.001)

    trace = run(_request(body, instrument=False))
    assert trace is not None and timers(trace) == []


@pytest.mark.skipif(LOOP == "uvloop", reason="uvloop's handles are its own")
def test_a_cancelled_traced_timer_left_in_the_loop_keeps_nothing_of_the_request() -> None:
    """asyncio keeps a cancelled handle in its heap until the due time or its next sweep, and
    with it the context it would have run in; for a traced timer that context holds the
    trace, which would then outlive its request by seconds."""
    left: list[Any] = []

    async def body() -> None:
        await asyncio.wait_for(asyncio.sleep(0), timeout=30)  # the 30 s deadline is cancelled

    async def main() -> None:
        loop = asyncio.get_running_loop()
        trace = await _request(body)
        assert trace is not None and any(t.state == "cancelled" for t in timers(trace))
        left.extend(h for h in loop._scheduled if h.cancelled())  # type: ignore[attr-defined]

    run(main())
    assert left  # still in the heap: its due time is 30 s away
    for handle in left:
        assert handle._callback is None and handle._context is None


# -- the C forms (TimerPatch, TimerCallback) against the Python ones ---------------------------


async def _slept() -> None:
    await asyncio.sleep(0.001)
    await asyncio.sleep(0)  # no timer


async def _scheduled_directly() -> None:
    loop = asyncio.get_running_loop()
    fired = asyncio.Event()

    def fire(label: str) -> None:
        annotate("label", label)  # inside the timer's run: on the timer
        fired.set()

    loop.call_later(5, fire, "never").cancel()
    loop.call_at(loop.time() - 1, fire, "late")  # due already: runs at once, late
    loop.call_later(0.0005, lambda: None)
    await fired.wait()
    await asyncio.sleep(0.002)


async def _deadlines() -> None:
    # The sleep's task is started before its deadline is set: a deadline of 1 ms set first
    # could, on a loaded machine, fire before the task's first step made its sleep's timer,
    # and the two forms' runs would then record different resources.
    sleeping = asyncio.ensure_future(asyncio.sleep(1))
    await asyncio.sleep(0)
    with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
        await asyncio.wait_for(sleeping, 0.001)  # reached
    await asyncio.wait_for(asyncio.sleep(0), 1)  # not reached
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(1):
            await asyncio.sleep(0)


async def _failing_and_refused() -> None:
    loop = asyncio.get_running_loop()

    def broken() -> None:
        raise KeyError("in a timer")

    loop.call_later(0, broken)
    await asyncio.sleep(0.001)
    with contextlib.suppress(TypeError):
        loop.call_later("soon", print)  # type: ignore[arg-type]


async def _spawning() -> None:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    async def child() -> None:
        done.set()

    loop.call_later(0, lambda: asyncio.ensure_future(child()))
    await done.wait()


_TIMED_NOTES = ("lateMs", "responseStartedAt")  # measured, so never the same twice


def _timer_shape(trace: Trace) -> Recorded:
    return [
        (
            (
                r.type,
                r.trigger_id,
                r.state,
                len(r.callbacks),
                sorted(
                    # a call_at's delay is its due time less the clock then: to the millisecond
                    (k, round(v) if k == "delayMs" else v)
                    for k, v in notes(trace, r).items()
                    if k not in _TIMED_NOTES
                ),
                "lateMs" in notes(trace, r),
            ),
            trace.stacks[r.stack_id] if r.stack_id is not None else None,
        )
        for r in trace.resources
    ]


@pytest.mark.parametrize(
    "body", [_slept, _scheduled_directly, _deadlines, _failing_and_refused, _spawning]
)
def test_the_c_timer_forms_record_what_the_python_ones_do(
    body: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asgi_asynctrace import _loop_methods, failure_counts

    module: Any = importlib.import_module("asgi_asynctrace.instrumentation.timers")
    if module._CTimerPatch is None:
        pytest.skip("the C accelerator is not built")
    made = []
    for python in (False, True):
        monkeypatch.setattr(module, "_python_forms", python)
        monkeypatch.setattr(_loop_methods, "_made", {})  # the loop patches made again, in that form
        made.append(traced(body))  # one line, so the stacks reach the same frames
    c_trace, python_trace = made
    assert any(r.type == "timer" for r in c_trace.resources)
    assert_recorded_alike(_timer_shape(c_trace), _timer_shape(python_trace))
    assert failure_counts() == {}


def test_a_timers_milliseconds_are_the_same_in_both_forms_and_to_the_microsecond() -> None:
    module: Any = importlib.import_module("asgi_asynctrace.instrumentation.timers")
    if module._CTimerPatch is None:
        pytest.skip("the C accelerator is not built")
    from asgi_asynctrace._speedups import duration_ms

    rng = random.Random(8)
    # ints on both sides of the C form's bound for seconds * 1000 in 64 bits, and beyond
    bound = (2**63 - 1) // 1000
    odd = [0.0, -0.0, -2.5, 5, 0, -3, True, False, 2.0**60, math.inf, -math.inf, 1e300,
           2.5e-6, 3.5e-6, 2**62, -(2**62), 2**70, bound, bound + 1]  # fmt: skip
    many = [rng.random() * 10 ** rng.randint(-9, 6) for _ in range(20_000)]
    halves = [k / 2_000_000 for k in range(20_000)]  # each halfway between two microseconds
    for seconds in [*odd, *many, *halves]:
        python, c = module._ms(seconds), duration_ms(seconds)
        assert type(python) is type(c) and python == c, seconds
        assert math.copysign(1, python) == math.copysign(1, c) == 1  # never -0.0
    for seconds in many:
        assert abs(module._ms(seconds) - max(seconds, 0) * 1000) <= 0.0005 + 1e-9
    assert module._ms(0.0025e-3) == 0.002 and module._ms(0.0035e-3) == 0.004  # halves to even
    assert module._ms(-1.0) == 0.0 and str(module._ms(-0.0)) == "0.0"
    assert module._ms(5) == 5000 and type(module._ms(5)) is int  # an int delay stays an int
    assert duration_ms(2**70) == 2**70 * 1000 and type(duration_ms(-3)) is float  # as round()
    assert math.isnan(module._ms(math.nan)) and math.isnan(duration_ms(math.nan))
