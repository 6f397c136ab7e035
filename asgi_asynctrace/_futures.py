"""Futures: a future made by ``loop.create_future()`` inside a traced request records when it
settles and which tasks waited for it.

    loop.create_future = make_create_future(original)   # what the hooks put on a loop's class

Outside traced requests ``create_future`` makes asyncio's own future, as without the hooks;
so does it for the futures asyncio makes for its own bookkeeping where another resource of
the trace already says what was waited for (``ASYNCIO_OWN``): a sleep's (its timer), and
``wait_for``'s and ``asyncio.wait``'s waiter (the tasks they wait for, and the deadline's timer).
Exports: ASYNCIO_OWN, TracedFuture, PY_FUTURE_METHODS, make_create_future.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from types import CodeType
from typing import Any

from ._context import ACTIVE, settle_from_exception
from ._failures import report
from ._model import Resource, Trace

_set_timed_hooks: Callable[..., None] | None
_CFutureMaker: Any
_CSettleAfter: Any
try:  # the optional C accelerator (see _speedups.c); each has its Python form here
    from ._speedups import FutureMaker as _CFutureMaker
    from ._speedups import SettleAfter as _CSettleAfter
    from ._speedups import set_timed_hooks as _set_timed_hooks
except ImportError:  # pragma: no cover - built everywhere the tests run
    _CFutureMaker = _CSettleAfter = _set_timed_hooks = None

__all__ = ["ASYNCIO_OWN", "PY_FUTURE_METHODS", "TracedFuture", "make_create_future"]


def _asyncio_own() -> tuple[CodeType, ...]:
    """The code of asyncio's functions whose futures are their own bookkeeping: each settles
    when a resource the trace records anyway does (a sleep's when its timer fires, a waiter when
    the task it waits for ends or the deadline's timer fires), so recording it would show one
    wait twice and cost as much as the wait's other resources. (From Python 3.12 ``wait_for``
    makes no future.)"""
    codes = []
    for name in ("sleep", "wait_for", "_wait"):
        code = getattr(getattr(asyncio.tasks, name, None), "__code__", None)
        if isinstance(code, CodeType):
            codes.append(code)
    return tuple(codes)


ASYNCIO_OWN = _asyncio_own()

_now = time.perf_counter_ns


class TracedFuture(asyncio.Future):  # type: ignore[type-arg]
    """A future that records the moment it settles."""

    __slots__ = ("_asynctrace_res", "_asynctrace_trace")

    _asynctrace_res: Resource | None
    _asynctrace_trace: Trace

    def set_result(self, result: Any) -> None:
        super().set_result(result)
        self._record("ok")

    def set_exception(self, exception: BaseException | type[BaseException]) -> None:
        super().set_exception(exception)
        self._record("error")

    def cancel(self, msg: Any = None) -> bool:
        cancelled = super().cancel(msg)
        if cancelled:
            self._record("cancelled")
        return cancelled

    def _record(self, state: str) -> None:
        res = self._asynctrace_res
        if res is not None:
            self._asynctrace_trace.settle(res, _now(), state)


if _set_timed_hooks is not None:
    _set_timed_hooks(TracedFuture, settle_from_exception, report)
# The Python forms of TracedFuture's methods (what runs without the accelerator).
PY_FUTURE_METHODS = {
    name: TracedFuture.__dict__[name] for name in ("set_result", "set_exception", "cancel")
}
if _CSettleAfter is not None:  # the same in C: asyncio's own method, then the settle
    TracedFuture.set_result = _CSettleAfter(asyncio.Future.set_result, "ok", False)  # type: ignore[method-assign]
    TracedFuture.set_exception = _CSettleAfter(asyncio.Future.set_exception, "error", False)  # type: ignore[method-assign]
    TracedFuture.cancel = _CSettleAfter(asyncio.Future.cancel, "cancelled", True)  # type: ignore[method-assign]


_python_futures = False  # True: the Python create_future below even with the accelerator (tests)


def make_create_future(original: Callable[..., Any]) -> Callable[..., asyncio.Future[Any]]:
    if _CFutureMaker is not None and not _python_futures:
        made: Callable[..., asyncio.Future[Any]] = _CFutureMaker(
            ACTIVE, original, TracedFuture, ASYNCIO_OWN
        )
        return made
    from ._tasks import dispatch_python  # (it imports this module)

    dispatcher = dispatch_python(len, len).__code__  # a frame that may come between
    own = frozenset(map(id, ASYNCIO_OWN))  # by identity (ASYNCIO_OWN keeps them alive)

    def create_future(loop: asyncio.AbstractEventLoop) -> asyncio.Future[Any]:
        active = ACTIVE.get()
        if active is None or active[0].closed or not active[0].record_futures:
            return original(loop)  # type: ignore[no-any-return]
        caller = sys._getframe(1)
        if caller.f_code is dispatcher and caller.f_back is not None:
            caller = caller.f_back
        if id(caller.f_code) in own:
            return original(loop)  # type: ignore[no-any-return]
        fut = TracedFuture(loop=loop)
        fut._asynctrace_trace = active[0]
        fut._asynctrace_res = None
        try:
            fut._asynctrace_res = active[0].new_resource("future", active[1], 1)
        except Exception as exc:
            report("create-future", exc)
        return fut

    return create_future
