"""Tasks: each step a task of a traced request runs, timed, and the task factory that times them.

    factory = task_factory_over(loop.get_task_factory())   # what the hooks put on a loop
    loop.set_task_factory(factory)                         # tasks of traced requests are timed

A task created inside a traced request runs its coroutine through ``TimedCoroutine``, which
records every ``send``/``throw`` as one callback interval and settles the task the moment its
coroutine returns or raises; outside traced requests the factory is a C pass-through
(``dispatch``) to the one it was chained over.
Exports: TimedCoroutine, PyTimedCoroutine, TaskFactory, dispatch, dispatch_python,
mark_coroutine_function, task_factory_over.
"""

from __future__ import annotations

import asyncio
import collections.abc
import inspect
import threading
import time
from collections.abc import Callable, Coroutine
from contextvars import Context
from typing import Any

from . import _stacks
from ._context import ACTIVE, settle_from_exception
from ._failures import report
from ._futures import TracedFuture
from ._model import Resource, Trace
from ._recording import check_watched

_CDispatch: Callable[..., Any] | None
_CTaskCall: Callable[..., Any] | None
_CTaskFactory: Callable[..., Any] | None
_CTimedCoroutine: Callable[..., Any] | None
try:  # the optional C accelerator (see _speedups.c); each has its Python form here
    from ._speedups import Dispatch as _CDispatch
    from ._speedups import TaskCall as _CTaskCall
    from ._speedups import TaskFactory as _CTaskFactory
    from ._speedups import TimedCoroutine as _CTimedCoroutine
except ImportError:  # pragma: no cover - built everywhere the tests run
    _CDispatch = _CTaskCall = _CTaskFactory = _CTimedCoroutine = None

__all__ = [
    "PyTimedCoroutine",
    "TaskFactory",
    "TimedCoroutine",
    "dispatch",
    "dispatch_python",
    "mark_coroutine_function",
    "task_factory_over",
]

_now = time.perf_counter_ns
_get_ident = threading.get_ident
TaskFactory = Callable[..., "asyncio.Future[Any]"]


class TimedCoroutine:
    """A coroutine that records each step it runs as a callback interval of ``res``.

    With the accelerator built, ``TimedCoroutine`` is its C form (same behaviour, driven by
    the task through ``am_send``: no bound method and no StopIteration made per step); this
    class is what runs without it (``PyTimedCoroutine``). Everything else (``cr_frame``,
    ``cr_await``, ``__qualname__``, ...) is the wrapped coroutine's, so ``Task.get_stack()``,
    ``inspect.getcoroutinestate()`` and task reprs work.
    It is also its own iterator, so ``await TimedCoroutine(app(...), ...)`` times the steps
    of the calling task below that point: the middleware measures the root that way.
    """

    __slots__ = ("_callbacks", "_coro", "_max", "_res", "_trace")

    def __init__(self, coro: Any, trace: Trace, res: Resource) -> None:
        self._coro = coro
        self._trace = trace
        self._res = res
        self._callbacks = res.callbacks
        self._max = 2 * trace.limits.max_callbacks_per_resource

    # The hot path: one call per step of every traced task. asyncio drives a task with
    # send(None) or next(), so both are this one function.
    def send(self, value: Any = None) -> Any:
        if self._trace.closed:
            return self._coro.send(value)
        cb = self._callbacks
        if len(cb) < self._max:
            cb.append(_now())
        else:
            self._trace.dropped.callbacks += 1
        trace = self._trace
        outer = trace._running  # the step running now, for the blocked-loop watchdog
        trace._running = (self._res, _get_ident())
        try:
            out = self._coro.send(value)
        except BaseException as exc:
            trace._running = outer
            self._stop(exc)
            raise
        trace._running = outer
        if len(cb) & 1:
            now = _now()
            cb.append(now)
            if self._trace._watched:  # uvloop timers: was one cancelled in this step?
                check_watched(self._trace, self._res, now)
        if type(out) is TracedFuture:
            self._awaits(out)
        return out

    __next__ = send

    def throw(self, *args: Any) -> Any:
        # Forward exactly what we were given: the 3-argument form is deprecated in 3.12.
        trace, res = self._trace, self._res
        if trace.closed:
            return self._coro.throw(*args)
        trace.begin(res, _now())
        outer = trace._running
        trace._running = (res, _get_ident())
        try:
            out = self._coro.throw(*args)
        except BaseException as exc:
            trace._running = outer
            self._stop(exc)
            raise
        trace._running = outer
        trace.end(res, _now())
        if type(out) is TracedFuture:
            self._awaits(out)
        return out

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> TimedCoroutine:
        return self

    def __iter__(self) -> TimedCoroutine:
        return self

    def __getattr__(self, name: str) -> Any:
        return getattr(self._coro, name)

    def __repr__(self) -> str:
        return repr(self._coro)

    def _stop(self, exc: BaseException) -> None:
        """The coroutine returned (StopIteration) or raised: the step ends, the task settles."""
        now = _now()
        trace, res = self._trace, self._res
        trace.end(res, now)
        if type(exc) is StopIteration:
            trace.settle(res, now, "ok")
        else:
            settle_from_exception(trace, res, now, exc)

    def _awaits(self, fut: TracedFuture) -> None:
        waited = fut._asynctrace_res
        if waited is not None:
            rid = self._res.async_id
            if waited.awaited_by is None:
                waited.awaited_by = [rid]
            elif rid not in waited.awaited_by:
                waited.awaited_by.append(rid)


def dispatch_python(untraced: Callable[..., Any], traced: Callable[..., Any]) -> Callable[..., Any]:
    """A callable that calls ``untraced`` outside traced requests and ``traced`` inside one."""
    get = ACTIVE.get

    def call(*args: Any, **kwargs: Any) -> Any:
        if get() is None:
            return untraced(*args, **kwargs)
        return traced(*args, **kwargs)

    return call


def mark_coroutine_function(fn: Any) -> None:
    """Make ``inspect`` and ``asyncio`` (and through them servers, Starlette and libraries that
    check) report ``fn`` as a coroutine function: it returns the coroutine an ``async def``
    would, without being one."""
    mark = getattr(inspect, "markcoroutinefunction", None)  # Python 3.12+
    if mark is not None:
        mark(fn)
    marker = getattr(asyncio.coroutines, "_is_coroutine", None)  # asyncio's own, before 3.14
    if marker is not None:
        fn._is_coroutine = marker


def dispatch(untraced: Callable[..., Any], traced: Callable[..., Any]) -> Callable[..., Any]:
    """``dispatch_python``, in C when the accelerator is built: what the hooks put on a loop
    once a request was traced, so every untraced request's calls cost one context lookup."""
    if _CDispatch is not None:
        return _CDispatch(ACTIVE, untraced, traced)  # type: ignore[no-any-return]
    return dispatch_python(untraced, traced)


# Registered rather than subclassed: asyncio accepts it as a coroutine, and creating one
# skips the ABC machinery.
collections.abc.Coroutine.register(TimedCoroutine)
PyTimedCoroutine = TimedCoroutine
# A stack walked inside the coroutine it drives goes on into the awaiter's frames.
_stacks.pass_through(TimedCoroutine.send.__code__, TimedCoroutine.throw.__code__)
if _CTimedCoroutine is not None:
    collections.abc.Coroutine.register(_CTimedCoroutine)  # type: ignore[arg-type]
    TimedCoroutine = _CTimedCoroutine  # type: ignore[misc,assignment]


Task = asyncio.Task


def _plain_factory() -> TaskFactory:
    """What asyncio does with no task factory set, as a factory."""
    if _CTaskCall is not None:
        return _CTaskCall(Task)  # type: ignore[no-any-return]

    def plain(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Future[Any]:
        return Task(coro, loop=loop, **kwargs)

    return plain


_last_factory: tuple[TaskFactory | None, TaskFactory] | None = None


def task_factory_over(previous: TaskFactory | None) -> TaskFactory:
    """Our factory chained over ``previous``; the last one made is reused for the same one."""
    global _last_factory
    last = _last_factory
    if last is not None and last[0] is previous:
        return last[1]
    factory = _make_task_factory(previous)
    _last_factory = (previous, factory)
    return factory


def _make_task_factory(previous: TaskFactory | None) -> TaskFactory:
    make = previous if previous is not None else _plain_factory()
    if _CTaskFactory is not None and TimedCoroutine is _CTimedCoroutine:
        # The same as asynctrace_task_factory below, in C.
        return dispatch(make, _CTaskFactory(ACTIVE, make, asyncio.iscoroutine))

    def asynctrace_task_factory(
        loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any
    ) -> asyncio.Future[Any]:
        active = ACTIVE.get()
        if active is None or active[0].closed or not asyncio.iscoroutine(coro):
            return make(loop, coro, **kwargs)
        try:
            trace = active[0]
            res = trace.new_resource("task", active[1], 1)
            if res is None:
                return make(loop, coro, **kwargs)
            name = getattr(coro, "__qualname__", None)
            if isinstance(name, str):
                trace.annotate(res, "coroutine", name)
            state = (trace, res)
            timed = TimedCoroutine(coro, trace, res)
            context: Context | None = kwargs.get("context")
            if context is not None:
                context = context.copy()
                context.run(ACTIVE.set, state)
                kwargs["context"] = context
        except Exception as exc:
            report("task-factory", exc)
            return make(loop, coro, **kwargs)
        if context is not None:
            return make(loop, timed, **kwargs)
        # The task copies the current context when it is made; give that copy the new task
        # as its current resource. Works on 3.10, whose factories take no context.
        token = ACTIVE.set(state)
        try:
            return make(loop, timed, **kwargs)
        finally:
            ACTIVE.reset(token)

    # Every untraced task made while a traced request runs goes straight to ``make``.
    return dispatch(make, asynctrace_task_factory)
