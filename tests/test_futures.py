"""Futures made inside a traced request: who made them, who waited, when they settled."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest

from asgi_asynctrace import (
    _hooks,
)
from tests.helpers import (
    assert_plausible,
    run,
    traced,
)


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
    deadline, sleep = [r for r in trace.resources if r.type == "timer"]
    assert trace.annotations_of(sleep.async_id)["kind"] == "sleep"
    assert sleep.state == "cancelled" and sleep.trigger_id == 1
    assert trace.annotations_of(deadline.async_id)["kind"] == "timeout"
    assert deadline.state == "ok"


def test_the_futures_asyncio_makes_for_a_sleep_or_a_wait_are_its_own() -> None:
    """A sleep's future settles as its timer fires; wait_for's and asyncio.wait's waiter as
    the task it waits for ends or its deadline fires. The trace has those, so the futures are
    left out (one wait, shown once), and the app's own futures are still recorded."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0.001)
        await asyncio.wait_for(asyncio.sleep(0.001), timeout=1)
        await asyncio.wait([asyncio.create_task(asyncio.sleep(0.001))], timeout=1)
        fut = loop.create_future()
        loop.call_soon(fut.set_result, 1)
        await fut

    trace = traced(body, futures=True)
    (future,) = [r for r in trace.resources if r.type == "future"]
    assert future.trigger_id == 1 and future.awaited_by == [1] and future.state == "ok"
    kinds = sorted(str(trace.annotations_of(r.async_id)["kind"]) for r in trace.resources
                   if r.type == "timer")  # fmt: skip
    deadline = "timeout" if sys.version_info >= (3, 12) else "wait_for"
    assert kinds == sorted(["sleep", "sleep", "sleep", deadline, "wait_for"])
    assert [r.state for r in trace.resources if r.type == "task"] == ["ok"] * (
        1 if sys.version_info >= (3, 12) else 2  # wait_for made a task before Python 3.12
    )
    assert_plausible(trace)


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
