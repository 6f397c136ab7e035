"""The asyncio hooks on a loop: on while traced requests run (and after, by default), off
again, shared by the loops of a class, chained with a task factory already there."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import sys
from typing import Any

import pytest

from asgi_asynctrace import (
    Trace,
    _hooks,
    _tasks,
    current_resource,
)
from tests.helpers import (
    LOOP,
    _request,
    leaf,
    run,
    traced,
    tree,
)


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
        event = asyncio.Event()
        asyncio.get_running_loop().call_soon(event.set)
        await event.wait()

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


def test_the_loop_under_test_is_the_one_asked_for() -> None:
    async def main() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert run(main()).startswith("uvloop" if LOOP == "uvloop" else "asyncio")


def test_without_the_accelerator_the_hooks_record_the_same_resources(
    monkeypatch: pytest.MonkeyPatch,
) -> None:

    async def body() -> None:
        await asyncio.gather(asyncio.sleep(0.001), asyncio.create_task(asyncio.sleep(0)))
        await asyncio.wait_for(asyncio.sleep(0), timeout=1)
        event = asyncio.Event()  # an app's future (a sleep's and wait_for's are asyncio's own)
        asyncio.get_running_loop().call_soon(event.set)
        await event.wait()

    def shape(trace: Trace) -> list[tuple[str, int, str]]:
        return [(r.type, r.trigger_id, r.state) for r in trace.resources]

    accelerated = traced(body, futures=True)
    monkeypatch.setattr(_tasks, "_CDispatch", None)
    monkeypatch.setattr(_tasks, "_CTaskCall", None)
    assert shape(traced(body, futures=True)) == shape(accelerated)
    assert {"task", "future", "timer"} <= {r.type for r in accelerated.resources}
