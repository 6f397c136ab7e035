"""asyncio's timers as ``timer`` resources: sleeps, ``call_later`` / ``call_at``, deadlines.

    asgi_asynctrace.instrument("timers")     # the middleware does this by default

Inside a traced request every ``loop.call_later`` / ``loop.call_at`` is a ``timer`` resource:
created by the code that scheduled it (``asyncio.sleep(0.2)``, the deadline of
``asyncio.timeout`` or ``wait_for``, your own ``call_later``), with its callback's run as its
callback interval, settled ``ok`` when it fired, ``error`` when its callback raised, and
``cancelled`` when it was cancelled first (a deadline that was not reached, a sleep whose task
was cancelled). Annotations: ``kind`` (sleep, timeout, wait_for, call_later, call_at),
``delayMs`` as requested, ``lateMs`` (how long after its due time it ran: a busy loop shows
here), and ``callback`` for timers scheduled directly.

The loop methods are replaced on the loop's class from the first traced request on, with the
asyncio hooks (outside traced requests they pass straight to the loop's own, in C), on
asyncio's loops and uvloop alike; the traced side is in C too when the accelerator is built
(``TimerPatch``, ``TimerCallback``), the Python forms here otherwise. On asyncio's loops a cancel is
recorded when it happens; uvloop gives no hook for it, so there a cancelled timer is settled
``cancelled`` as the step that cancelled it ends (a step of the task that made it asks that
task's pending uvloop timers whether they were cancelled, a step of the request itself asks
all of them), or, after the last step, when the request ends. ``asyncio.sleep(0)`` schedules
no timer and records none.
Exports: TimersInstrumentation, instrumentation.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from asgi_asynctrace._context import ACTIVE
from asgi_asynctrace._failures import report
from asgi_asynctrace._hooks import add_loop_patch, remove_loop_patch
from asgi_asynctrace._model import Resource, Trace
from asgi_asynctrace._recording import check_watched
from asgi_asynctrace._tasks import dispatch_python

from ._base import Instrumentation

_CTimerCallback: Any
_CTimerCancel: Any
_CTimerPatch: Any
_set_timer_hooks: Any
try:  # the optional C accelerator: TimerCallback and TimerPatch are the forms below, in C
    from asgi_asynctrace._speedups import TimerCallback as _CTimerCallback
    from asgi_asynctrace._speedups import TimerCancel as _CTimerCancel
    from asgi_asynctrace._speedups import TimerPatch as _CTimerPatch
    from asgi_asynctrace._speedups import set_timer_hooks as _set_timer_hooks
except ImportError:  # pragma: no cover - built everywhere the tests run
    _CTimerCallback = _CTimerCancel = _CTimerPatch = _set_timer_hooks = None

__all__ = ["TimersInstrumentation", "instrumentation"]

_now = time.perf_counter_ns
# asyncio's call_later computes the due time and calls call_at: on asyncio's loops only call_at
# is patched, and a call from call_later is recorded as what it was.
_ASYNCIO_CALL_LATER: Any = asyncio.BaseEventLoop.call_later
_CALL_LATER_CODE = _ASYNCIO_CALL_LATER.__code__
_DELAY_INDEX = _CALL_LATER_CODE.co_varnames.index("delay")  # where C reads it in the frame
# The frame the Python dispatcher (no accelerator) puts between a loop method and its caller.
_PYTHON_DISPATCH_CODE = dispatch_python(print, print).__code__


def _ms(seconds: Any) -> Any:
    """A duration in milliseconds, to the microsecond (as the C form writes it): round() of a
    float's microseconds, then / 1000, since round(x, 3) costs a decimal conversion; an int
    not below 0 times 1000, which is what round() would give back."""
    if type(seconds) is float:
        micro = max(seconds, 0.0) * 1000 * 1000
        if abs(micro) < 2**52:
            return round(micro) / 1000
    elif type(seconds) is int and seconds >= 0:
        return seconds * 1000
    return round(max(seconds, 0.0) * 1000, 3)


def _kind(callback: Any, default: str) -> str:
    name = getattr(callback, "__qualname__", "")
    if name == "_set_result_unless_cancelled":
        return "sleep"
    if name == "Timeout._on_timeout":
        return "timeout"
    if name == "_release_waiter":  # wait_for's deadline before Python 3.12
        return "wait_for"
    return default


class _TimerCallback:
    """What the loop runs in place of a traced timer's callback."""

    __slots__ = ("callback", "handle", "loop", "res", "trace", "when")

    def __init__(self, callback: Any, trace: Trace, res: Resource, loop: Any, when: float) -> None:
        self.callback = callback
        self.trace = trace
        self.res = res
        self.loop = loop
        self.when = when
        self.handle: Any = None

    def __call__(self, *args: Any) -> Any:
        trace, res = self.trace, self.res
        if trace.closed:
            return self.callback(*args)
        token = None
        try:
            trace.begin(res, _now())
            late = self.loop.time() - self.when
            trace.annotate(res, "lateMs", _ms(late))
            token = ACTIVE.set((trace, res))
        except Exception as exc:
            report("timers", exc)
        outer = trace._running  # the step running now, for the blocked-loop watchdog
        trace._running = (res, threading.get_ident())
        try:
            out = self.callback(*args)
        except BaseException as exc:
            trace._running = outer
            self._done("error", exc, token)
            raise
        trace._running = outer
        self._done("ok", None, token)
        return out

    def _done(self, state: str, exc: BaseException | None, token: Any) -> None:
        try:
            if token is not None:
                ACTIVE.reset(token)
            now = _now()
            self.trace.end(self.res, now)
            self.trace.settle(self.res, now, state)
            if exc is not None:
                self.trace.annotate(self.res, "error", type(exc).__qualname__)
        except Exception as failure:
            report("timers", failure)

    def cancelled(self) -> None:
        if not self.trace.closed:
            self.trace.settle(self.res, _now(), "cancelled")

    def __repr__(self) -> str:
        return repr(self.callback)


def _settle_cancelled(trace: Trace, now: int) -> None:
    """The trace's finisher once it watches a timer whose loop reports no cancel (uvloop): a
    cancel after the request's last step is found as the request ends (``check_watched`` at
    the root asks every watched timer); then nothing more is watched."""
    if trace._watched and trace.resources:
        check_watched(trace, trace.resources[0], now)
    trace._watched = None


def _unsettled_append(trace: Trace, callback: Any) -> None:
    """A timer whose loop reports no cancel (uvloop): watched, under the resource that made it,
    as steps end (``Trace.end``, and a task's step in C; see ``check_watched``), which settles
    it at the end of the step that cancelled it; and looked at when the request ends."""
    watched = trace._watched
    if watched is None:
        watched = trace._watched = {}
        trace.finishers.append(_settle_cancelled)
    res = callback.res
    watched.setdefault(res.trigger_id, []).append((res, callback.handle))


def _record(
    loop: Any, original: Callable[..., Any], when: float, delay: float,
    callback: Any, args: tuple[Any, ...], context: Any, default_kind: str, takes_delay: bool,
    skip: int = 3,
) -> Any:  # fmt: skip
    arg = delay if takes_delay else when  # what ``original`` takes: a delay or a due time
    wrapper = None
    try:
        trace, parent = ACTIVE.get()  # type: ignore[misc]
        # The stack starts at whoever called call_later: asyncio.sleep, a timeout, the app.
        res = trace.new_resource("timer", parent, skip - 1)
        if res is not None:
            wrapper = _TimerCallback(callback, trace, res, loop, when)
            kind = _kind(callback, default_kind)
            trace.annotate(res, "kind", kind)
            trace.annotate(res, "delayMs", _ms(delay))
            if kind == default_kind:
                name = getattr(callback, "__qualname__", None) or type(callback).__qualname__
                trace.annotate(res, "callback", name)
    except Exception as exc:
        report("timers", exc)
    if wrapper is None:
        return original(loop, arg, callback, *args, context=context)
    try:
        handle = original(loop, arg, wrapper, *args, context=context)
    except BaseException as exc:  # refused by the loop (a bad delay, a closed loop): as ever
        wrapper.trace.settle(wrapper.res, _now(), "error")
        wrapper.trace.annotate(wrapper.res, "error", type(exc).__qualname__)
        raise
    wrapper.handle = handle
    if type(handle) is asyncio.TimerHandle:  # asyncio's loops: the handle records its cancel
        try:
            handle.__class__ = _TracedTimerHandle
            return handle
        except TypeError as exc:
            report("timers", exc)
    try:  # uvloop's handles are its own: a cancel is found as the step that made it ends
        _unsettled_append(wrapper.trace, wrapper)
    except Exception as exc:
        report("timers", exc)
    return handle


# The hooks run these only inside traced requests: elsewhere the loop's own method is called
# directly (in C when the accelerator is built), with no frame of ours.
def _make_call_later(original: Callable[..., Any]) -> Callable[..., Any] | None:
    if original is _ASYNCIO_CALL_LATER:
        return None  # it calls call_at, whose patch records it: one dispatch per call, not two
    if _in_c():
        patch: Callable[..., Any] = _CTimerPatch(
            original, "call_later", True, _CALL_LATER_CODE, _DELAY_INDEX
        )
        return patch

    def call_later(loop: Any, delay: float, callback: Any, *args: Any, context: Any = None) -> Any:
        active = ACTIVE.get()
        if active is None or active[0].closed or type(callback) in _CALLBACK_TYPES:
            return original(loop, delay, callback, *args, context=context)
        try:
            when = loop.time() + delay
        except TypeError:  # not a number: the loop's own error, untraced
            return original(loop, delay, callback, *args, context=context)
        return _record(loop, original, when, delay, callback, args, context,
                       "call_later", True)  # fmt: skip

    return call_later


def _make_call_at(original: Callable[..., Any]) -> Callable[..., Any]:
    if _in_c():
        patch: Callable[..., Any] = _CTimerPatch(
            original, "call_at", False, _CALL_LATER_CODE, _DELAY_INDEX
        )
        return patch

    def call_at(loop: Any, when: float, callback: Any, *args: Any, context: Any = None) -> Any:
        active = ACTIVE.get()
        if active is None or active[0].closed or type(callback) in _CALLBACK_TYPES:
            return original(loop, when, callback, *args, context=context)
        caller: Any = sys._getframe(1)
        skip = 3  # _record, this, then whoever called call_at
        if caller.f_code is _PYTHON_DISPATCH_CODE:  # no accelerator: the dispatcher's frame
            caller, skip = caller.f_back, skip + 1
        if caller is not None and caller.f_code is _CALL_LATER_CODE:  # asyncio's call_later
            delay = caller.f_locals.get("delay")  # recorded as one, with the delay as asked
            if isinstance(delay, (int, float)):
                return _record(loop, original, when, delay, callback, args, context,
                               "call_later", False, skip=skip + 1)  # fmt: skip
        try:
            delay = when - loop.time()
        except TypeError:  # not a number: the loop's own error, untraced
            return original(loop, when, callback, *args, context=context)
        return _record(loop, original, when, delay, callback, args, context,
                       "call_at", False, skip=skip)  # fmt: skip

    return call_at


class _TracedTimerHandle(asyncio.TimerHandle):
    """What a traced timer's handle becomes on asyncio's loops: a ``TimerHandle`` whose
    ``cancel()`` records the cancel as it happens. Only traced timers' handles take this class
    (assigned after the loop made them, same layout), so no other cancel pays anything.

    A cancelled handle stays in the loop's heap until its due time or the loop's next sweep of
    cancelled handles (a deadline of seconds that was not reached, say); asyncio drops its
    callback then but keeps the context it would have run in, and that context holds the
    request's trace. A cancelled handle never runs, so the context is dropped too: the trace
    goes when its request ends, not seconds later, after the collector had to move it up."""

    __slots__ = ()

    def cancel(self) -> None:
        callback = self._callback  # type: ignore[attr-defined]
        if not self._cancelled and type(callback) in _CALLBACK_TYPES:
            try:
                callback.cancelled()
            except Exception as exc:
                report("timers", exc)
        super().cancel()
        self._context = None


_TracedTimerHandle.__name__ = "TimerHandle"  # its repr() stays asyncio's
_CALLBACK_TYPES = frozenset(t for t in (_TimerCallback, _CTimerCallback) if t is not None)
if _CTimerCancel is not None:  # the same cancel() in C: no Python frame of ours per cancel
    _TracedTimerHandle.cancel = _CTimerCancel(  # type: ignore[method-assign]
        asyncio.TimerHandle.cancel, _TimerCallback
    )
# The C forms unless a test asks for these (``use_python``).
_python_forms = False


def _in_c() -> bool:
    return _CTimerPatch is not None and not _python_forms


if _set_timer_hooks is not None:
    _set_timer_hooks(ACTIVE, asyncio.TimerHandle, _TracedTimerHandle, _unsettled_append)


class TimersInstrumentation(Instrumentation):
    name = "timers"
    library = "asyncio"
    supported = ()

    def _install(self, module: ModuleType) -> None:
        add_loop_patch("call_later", _make_call_later)
        add_loop_patch("call_at", _make_call_at)

    def uninstall(self) -> None:
        for name in ("call_later", "call_at"):
            remove_loop_patch(name)
        super().uninstall()


instrumentation = TimersInstrumentation()
