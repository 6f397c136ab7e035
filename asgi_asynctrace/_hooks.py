"""asyncio hooks, the counterpart of a PromiseHook: tasks, each of their steps, and futures.

    release = acquire_hooks(asyncio.get_running_loop())   # the middleware does this
    ...                                                   # traced work on this loop
    release()

A task created inside a traced request runs its coroutine through ``TimedCoroutine``, which
records every ``send``/``throw`` as one callback interval and settles the task the moment its
coroutine returns or raises. Futures made by ``loop.create_future()`` inside a traced request
are ``TracedFuture``s, which record when they settle and which task waited for them.

Hooks are installed on a loop when its first traced request starts, so a process that never
traces pays nothing at all. They then stay, by default, until the loop closes or
``uninstall_hooks()``: outside traced requests every one of them is a C pass-through to the
loop's own method (costing nothing measurable; asyncio's ``create_future`` even gets cheaper),
while taking them off and on again costs the process real time (see ``LINGER_S``). Loop
methods are replaced on the loop's class, never on the loop object (see ``_class_patches``).
Instrumentation adds its own loop methods to them (``add_loop_patch``: the timers).
Exports: TimedCoroutine, TracedFuture, acquire_hooks, install_hooks, uninstall_hooks,
add_loop_patch, remove_loop_patch, hooks_on_ns, LoopPatch.
"""

from __future__ import annotations

import asyncio
import collections.abc
import inspect
import math
import threading
import time
import types
import weakref
from collections.abc import Callable, Coroutine
from contextvars import Context
from typing import Any

from . import _stacks, _threads
from ._context import ACTIVE, settle_from_exception
from ._failures import report
from ._model import Resource, Trace, check_watched

_CDispatch: Callable[..., Any] | None
_CTaskCall: Callable[..., Any] | None
_CTaskFactory: Callable[..., Any] | None
_CTimedCoroutine: Callable[..., Any] | None
_set_timed_hooks: Callable[..., None] | None
_CFutureMaker: Any
_CSettleAfter: Any
try:  # the optional C accelerator (see _speedups.c); each has its Python form here
    from ._speedups import Dispatch as _CDispatch
    from ._speedups import FutureMaker as _CFutureMaker
    from ._speedups import SettleAfter as _CSettleAfter
    from ._speedups import TaskCall as _CTaskCall
    from ._speedups import TaskFactory as _CTaskFactory
    from ._speedups import TimedCoroutine as _CTimedCoroutine
    from ._speedups import set_timed_hooks as _set_timed_hooks
except ImportError:  # pragma: no cover - built everywhere the tests run
    _CDispatch = _CTaskCall = _CTaskFactory = _CTimedCoroutine = _set_timed_hooks = None
    _CFutureMaker = _CSettleAfter = None

__all__ = [
    "LINGER_S",
    "LoopPatch",
    "TimedCoroutine",
    "TracedFuture",
    "acquire_hooks",
    "add_loop_patch",
    "dispatch",
    "dispatch_python",
    "hooks_on_ns",
    "install_hooks",
    "remove_loop_patch",
    "uninstall_hooks",
]

_now = time.perf_counter_ns
_get_ident = threading.get_ident
TaskFactory = Callable[..., "asyncio.Future[Any]"]
#: make(original) -> what runs in place of a loop method while the hooks are on, called as
#: ``method(loop, *args, **kwargs)``; ``original`` is called the same way, loop first. None:
#: this loop's method needs no patch (it calls another patched method that records it).
LoopPatch = Callable[[Callable[..., Any]], "Callable[..., Any] | None"]
# What _patch_on_class says of a method whose patch declined it: leave the method alone.
_NOT_NEEDED: Any = ("", "")
# Loop methods that instrumentation (timers) adds to the hooks: name -> (make, always), where
# ``always`` says the method runs on every call, not only inside traced requests.
_loop_patches: dict[str, tuple[LoopPatch, bool]] = {}
_MISSING: Any = object()


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


class _ClassPatch:
    """One method of a loop class replaced while any loop of that class has hooks on."""

    __slots__ = ("ours", "previous", "refs")

    def __init__(self, previous: Any, ours: Any) -> None:
        self.previous = previous  # what the class itself held under that name, or _MISSING
        self.ours = ours
        self.refs = 1


# (loop class, method name) -> its patch. Classes, not instances: on CPython 3.11+ an object's
# attributes live in a compact array until its __dict__ is first asked for, and from then on
# every attribute and method lookup on it is slower (about 10 ns a loop method call, for the
# life of the loop). Patching the class leaves the loop's own attributes as they were.
_class_patches: dict[tuple[type, str], _ClassPatch] = {}
# (loop class, method name) -> (original, make, always, what goes on the class)
_made: dict[tuple[type, str], tuple[Any, LoopPatch, bool, Any]] = {}


# Loops of one class may run in several threads (a loop per thread, asgiref's async_to_sync):
# the shared class patches are counted under a lock. Re-entrant: a loop garbage collected in
# the middle of a patch gives its own back from inside the collection.
_class_lock = threading.RLock()


def _patch_on_class(loop: asyncio.AbstractEventLoop, name: str, make: LoopPatch,
                    always: bool) -> tuple[type, str] | None:  # fmt: skip
    """Put ``name`` on the loop's class (shared by its loops); its key, or None if it cannot go
    there: the loop has its own ``name`` already, or its class takes no new attributes."""
    with _class_lock:
        return _patch_on_class_locked(loop, name, make, always)


def _patch_on_class_locked(loop: asyncio.AbstractEventLoop, name: str, make: LoopPatch,
                           always: bool) -> tuple[type, str] | None:  # fmt: skip
    cls = type(loop)
    original = getattr(cls, name, None)
    if original is None:
        return None
    for key, patch in list(_class_patches.items()):  # ours already, put on a base class
        if patch.ours is original:
            patch.refs += 1
            return key
    bind = getattr(type(original), "__get__", None)
    if bind is None or getattr(loop, name, None) != bind(original, loop, cls):
        return None  # the instance has its own: only an instance patch can come before it
    made = _made.get((cls, name))
    if made is None or made[0] is not original or made[1] is not make or made[2] is not always:
        traced = make(original)  # made once per class and method, not on every install
        untraced = _exact_equivalents().get(original, original)
        if traced is None or always:
            made = (original, make, always, traced)
        else:
            made = (original, make, always, dispatch(untraced, traced))
        _made[(cls, name)] = made
    ours = made[3]
    if ours is None:
        return _NOT_NEEDED  # type: ignore[no-any-return]
    previous = cls.__dict__.get(name, _MISSING)
    try:
        setattr(cls, name, ours)
    except (TypeError, AttributeError):
        return None  # a static type: patched per instance instead
    _class_patches[(cls, name)] = _ClassPatch(previous, ours)
    return (cls, name)


def _exact_equivalents() -> dict[Any, Any]:
    """Loop methods of asyncio's own that C does exactly, for the untraced side of a patch: an
    untraced call then runs no Python frame at all (asyncio's is one line of Python)."""
    if _CTaskCall is None:
        return {}
    return {asyncio.BaseEventLoop.create_future: _CTaskCall(asyncio.Future)}


def _unpatch_class(key: tuple[type, str]) -> None:
    with _class_lock:
        _unpatch_class_locked(key)


def _unpatch_class_locked(key: tuple[type, str]) -> None:
    patch = _class_patches.get(key)
    if patch is None:
        return
    patch.refs -= 1
    if patch.refs:
        return
    del _class_patches[key]
    cls, name = key
    if cls.__dict__.get(name) is not patch.ours:
        return  # someone replaced it after us: theirs stays, ours passes through anyway
    if patch.previous is _MISSING:
        delattr(cls, name)
    else:
        setattr(cls, name, patch.previous)


class _LoopHooks:
    """The hooks installed on one loop, and how to take them off again.

    Loop methods are replaced on the loop's class (asyncio's loops and uvloop's ``Loop`` are
    Python classes), shared by reference count with other loops of that class and passing
    straight through outside traced requests; only where the instance already carries its own
    method, or its class is a static type, does the replacement go in the instance's
    ``__dict__``. The task factory is the loop's own setting.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.refs = 0
        self.previous_factory: TaskFactory | None = None
        self.factory: TaskFactory | None = None
        # name -> ("class", key) or ("instance", what the instance held before, what we put)
        self.methods: dict[str, tuple[str, Any, Any]] = {}
        self.held = _Held()  # what must be given back if the loop goes away with hooks on
        self.idle_since = 0  # when refs last fell to 0 (perf_counter_ns)
        self.linger_ns = 0
        self.pending: asyncio.TimerHandle | None = None  # the check that may take them off
        weakref.finalize(loop, self.held.forget)

    @property
    def installed(self) -> bool:
        return self.held.installed

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self.held.installed = True
        self.held.on_since = _now()
        self.previous_factory = loop.get_task_factory()
        self.factory = _task_factory_over(self.previous_factory)
        loop.set_task_factory(self.factory)
        _threads.acquire()
        self.put(loop, "create_future", _make_create_future, False)
        self.put(loop, "close", _make_close, True)
        for name, (make, always) in list(_loop_patches.items()):
            self.put(loop, name, make, always)

    def put(self, loop: asyncio.AbstractEventLoop, name: str, make: LoopPatch,
            always: bool) -> None:  # fmt: skip
        if name in self.methods:
            return
        try:
            key = _patch_on_class(loop, name, make, always)
            if key is _NOT_NEEDED:
                return
            if key is not None:
                self.methods[name] = ("class", key, None)
                self.held.keys.append(key)
                return
            namespace = getattr(loop, "__dict__", None)
            bound = getattr(loop, name, None)
            if namespace is None or bound is None:
                return  # a loop we cannot extend, or without that method: left out

            def original(_loop: Any, *args: Any, **kwargs: Any) -> Any:
                return bound(*args, **kwargs)

            patch = make(original)
            if patch is None:
                return
            method = types.MethodType(patch, loop)
            ours = method if always else dispatch(bound, method)
        except Exception as exc:
            report(f"loop-patch:{name}", exc)
            return
        self.methods[name] = ("instance", namespace.get(name), ours)
        namespace[name] = ours

    def take(self, loop: asyncio.AbstractEventLoop, name: str) -> None:
        kind, previous, ours = self.methods.pop(name, ("", None, None))
        if kind == "class":
            if previous in self.held.keys:
                self.held.keys.remove(previous)
                _unpatch_class(previous)
            return
        namespace = getattr(loop, "__dict__", None) if kind else None
        if ours is None or namespace is None or namespace.get(name) is not ours:
            return  # someone replaced it after us: theirs stays, ours passes through anyway
        if previous is None:
            del namespace[name]
        else:
            namespace[name] = previous

    def idle(self, loop: asyncio.AbstractEventLoop, linger: float) -> None:
        """The last traced request on this loop ended: take the hooks off after ``linger``
        seconds without another one (at once if 0, or if the loop is not running; never if
        infinite, the default)."""
        if linger == math.inf and not loop.is_closed():
            return
        if linger <= 0 or loop.is_closed() or not loop.is_running():
            self.uninstall(loop)
            return
        self.idle_since = _now()
        self.linger_ns = int(linger * 1e9)
        if self.pending is None:
            self._schedule(loop, linger)

    def _schedule(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        # In a context of its own: never recorded as a timer of whatever trace is current.
        self.pending = Context().run(loop.call_later, delay, self._check, loop)

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        self.pending = None
        if self.refs or not self.installed:
            return
        left = self.idle_since + self.linger_ns - _now()
        if left > 0:
            self._schedule(loop, left / 1e9)
        else:
            self.uninstall(loop)

    def uninstall(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self.installed:
            return
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None
        # Someone may have stacked their own factory on ours since: then ours stays in their
        # chain, harmless, since it passes everything through outside traced requests.
        if loop.get_task_factory() is self.factory:
            loop.set_task_factory(self.previous_factory)
        for name in list(self.methods):
            self.take(loop, name)
        self.factory = None
        self.held.forget()


class _Held:
    """What a loop's hooks hold outside the loop (class patches, the thread hooks, time on),
    given back by uninstall(), or when the loop is garbage collected with hooks still on (a
    loop closed while they lingered)."""

    __slots__ = ("installed", "keys", "on_since")

    def __init__(self) -> None:
        self.installed = False
        self.keys: list[tuple[type, str]] = []
        self.on_since = 0

    def forget(self) -> None:
        if not self.installed:
            return
        self.installed = False
        for key in self.keys:
            _unpatch_class(key)
        self.keys.clear()
        _threads.release()
        global _on_ns
        _on_ns += _now() - self.on_since


_on_ns = 0  # how long hooks were on, summed over loops, up to their last uninstall


def hooks_on_ns() -> int:
    """How long the hooks have been on in this process, summed over loops, in nanoseconds.

    While they are on (by default, from the first traced request on), every untraced
    request's task, future and timer goes through them: one context lookup each.
    """
    now = _now()
    return _on_ns + sum(now - h.held.on_since for h in list(_loops.values()) if h.installed)


_loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopHooks] = (
    weakref.WeakKeyDictionary()
)


#: Seconds the hooks stay on a loop after its last traced request ends: by default for good
#: (until the loop closes or ``uninstall_hooks()``). Taking them off and putting them back
#: changes the loop's class, and CPython then re-learns every specialized lookup on it: at
#: 1 % sampling, hooks taken off after each traced request cost /cache 1.2 M instructions per
#: traced request (valgrind), against nothing measurable for hooks left on, whose untraced
#: side is a C pass-through.
LINGER_S = math.inf


def acquire_hooks(
    loop: asyncio.AbstractEventLoop, linger: float | None = None
) -> Callable[[], None]:
    """Make sure the hooks are on ``loop``; returns the function that gives them back.

    When the last holder gives them back they stay on for ``linger`` seconds (default
    ``LINGER_S``: for good) in case another traced request comes, then come off.
    """
    global _last
    last_loop, last_hooks = _last
    hooks: _LoopHooks | None = last_hooks if last_loop() is loop else None
    if hooks is None:
        hooks = _loops.get(loop)
        if hooks is None:
            hooks = _loops[loop] = _LoopHooks(loop)
        _last = (weakref.ref(loop), hooks)
    if not hooks.held.installed:
        hooks.install(loop)
    hooks.refs += 1
    return _Release(hooks, loop, LINGER_S if linger is None else linger)


def _no_loop() -> None:
    return None


# The loop acquire_hooks last saw (weakly) and its hooks: a process traces on one loop, or a
# few, and a WeakKeyDictionary lookup runs three Python frames.
_last: tuple[Callable[[], Any], _LoopHooks | None] = (_no_loop, None)


class _Release:
    """What ``acquire_hooks`` returns: gives the hooks back once, however often called (an
    object rather than a closure: one allocation per traced request instead of six)."""

    __slots__ = ("hooks", "linger", "loop")

    def __init__(self, hooks: _LoopHooks, loop: asyncio.AbstractEventLoop, linger: float) -> None:
        self.hooks: _LoopHooks | None = hooks
        self.loop = loop
        self.linger = linger

    def __call__(self) -> None:
        hooks = self.hooks
        if hooks is None:
            return
        self.hooks = None
        hooks.refs -= 1
        if hooks.refs == 0:
            hooks.idle(self.loop, self.linger)


def add_loop_patch(name: str, make: LoopPatch, *, always: bool = False) -> None:
    """Run ``make(original)`` in place of the loop method ``name`` whenever the hooks are on.

    The replacement is called as ``method(loop, *args, **kwargs)`` and calls ``original`` the
    same way. It runs only inside traced requests (other calls go straight to the original,
    in C when the accelerator is built) unless ``always``: then on every call, for as long
    as the hooks are on, and it must pass untraced calls through itself. Applies at
    once to loops with hooks on now.
    """
    _loop_patches[name] = (make, always)
    for loop, hooks in list(_loops.items()):
        if hooks.installed:
            hooks.put(loop, name, make, always)


def remove_loop_patch(name: str) -> None:
    """Undo ``add_loop_patch(name)``, on loops with hooks on now too."""
    if _loop_patches.pop(name, None) is not None:
        for loop, hooks in list(_loops.items()):
            if hooks.installed:
                hooks.take(loop, name)


_pinned: dict[int, Callable[[], None]] = {}


def install_hooks(loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Keep the hooks on ``loop`` (default: the running one) until ``uninstall_hooks()``.

    The middleware installs them on its own for as long as a traced request runs; call this
    at startup only to chain them under a task factory you set later, or to trace work
    started outside a request with ``Trace`` and ``ACTIVE`` directly.
    """
    loop = loop or asyncio.get_running_loop()
    if id(loop) not in _pinned:
        _pinned[id(loop)] = acquire_hooks(loop, linger=0)


def uninstall_hooks(loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Take the hooks off ``loop`` now: undo ``install_hooks()``, and cut short the linger
    after the last traced request. Hooks in use by a traced request stay until it ends."""
    loop = loop or asyncio.get_running_loop()
    release = _pinned.pop(id(loop), None)
    if release is not None:
        release()
    hooks = _loops.get(loop)
    if hooks is not None and hooks.refs == 0:
        hooks.uninstall(loop)


Task = asyncio.Task


def _plain_factory() -> TaskFactory:
    """What asyncio does with no task factory set, as a factory."""
    if _CTaskCall is not None:
        return _CTaskCall(Task)  # type: ignore[no-any-return]

    def plain(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Future[Any]:
        return Task(coro, loop=loop, **kwargs)

    return plain


_last_factory: tuple[TaskFactory | None, TaskFactory] | None = None


def _task_factory_over(previous: TaskFactory | None) -> TaskFactory:
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


def _make_close(original: Callable[..., Any]) -> Callable[..., Any]:
    # A loop closed while its hooks linger takes them off first: nothing of ours outlives it.
    def close(loop: asyncio.AbstractEventLoop) -> Any:
        hooks = _loops.get(loop)
        if hooks is not None:
            try:
                hooks.uninstall(loop)
            except Exception as exc:
                report("hooks-close", exc)
        return original(loop)

    return close


_python_futures = False  # True: the Python create_future below even with the accelerator (tests)


def _make_create_future(original: Callable[..., Any]) -> Callable[..., asyncio.Future[Any]]:
    if _CFutureMaker is not None and not _python_futures:
        made: Callable[..., asyncio.Future[Any]] = _CFutureMaker(ACTIVE, original, TracedFuture)
        return made

    def create_future(loop: asyncio.AbstractEventLoop) -> asyncio.Future[Any]:
        active = ACTIVE.get()
        if active is None or active[0].closed or not active[0].record_futures:
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
