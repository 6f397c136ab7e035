"""asyncio hooks, the counterpart of a PromiseHook: tasks, each of their steps, and futures.

    release = acquire_hooks(asyncio.get_running_loop())   # the middleware does this
    ...                                                   # traced work on this loop
    release()

Inside a traced request a task runs its coroutine through ``TimedCoroutine`` (``_tasks``),
which records every step, and ``loop.create_future()`` makes a ``TracedFuture`` (``_futures``),
which records when it settles and which task waited for it. This module puts them on a loop
and takes them off again.

Hooks are installed on a loop when its first traced request starts, so a process that never
traces pays nothing at all. They then stay, by default, until the loop closes or
``uninstall_hooks()``: outside traced requests every one of them is a C pass-through to the
loop's own method (costing nothing measurable; asyncio's ``create_future`` even gets cheaper),
while taking them off and on again costs the process real time (see ``LINGER_S``). Loop
methods are replaced on the loop's class, never on the loop object (see ``_loop_methods``).
Instrumentation adds its own loop methods to them (``add_loop_patch``: the timers).
Exports: acquire_hooks, hold_hooks, install_hooks, uninstall_hooks, add_loop_patch,
remove_loop_patch, hooks_on_ns, LINGER_S.
"""

from __future__ import annotations

import asyncio
import math
import time
import types
import weakref
from collections.abc import Callable
from contextvars import Context
from typing import Any

from . import _threads
from ._failures import report
from ._futures import make_create_future
from ._loop_methods import NOT_NEEDED, LoopPatch, patch_on_class, unpatch_class
from ._tasks import TaskFactory, dispatch, task_factory_over

__all__ = [
    "LINGER_S",
    "acquire_hooks",
    "add_loop_patch",
    "hold_hooks",
    "hooks_on_ns",
    "install_hooks",
    "remove_loop_patch",
    "uninstall_hooks",
]

_now = time.perf_counter_ns
# Loop methods that instrumentation (timers) adds to the hooks: name -> (make, always), where
# ``always`` says the method runs on every call, not only inside traced requests.
_loop_patches: dict[str, tuple[LoopPatch, bool]] = {}


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
        self.factory = task_factory_over(self.previous_factory)
        loop.set_task_factory(self.factory)
        _threads.acquire()
        self.put(loop, "create_future", make_create_future, False)
        self.put(loop, "close", _make_close, True)
        for name, (make, always) in list(_loop_patches.items()):
            self.put(loop, name, make, always)

    def put(self, loop: asyncio.AbstractEventLoop, name: str, make: LoopPatch,
            always: bool) -> None:  # fmt: skip
        if name in self.methods:
            return
        try:
            key = patch_on_class(loop, name, make, always)
            if key is NOT_NEEDED:
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
                unpatch_class(previous)
            return
        namespace = getattr(loop, "__dict__", None) if kind else None
        if ours is None or namespace is None or namespace.get(name) is not ours:
            return  # someone replaced it after us: theirs stays, ours passes through anyway
        if previous is None:
            del namespace[name]
        else:
            namespace[name] = previous

    def let_go(self, loop: asyncio.AbstractEventLoop, linger: float) -> None:
        """A holder (``hold_hooks``) gives them back; the last one leaves them ``idle``."""
        self.refs -= 1
        if self.refs == 0:
            self.idle(loop, linger)

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
            unpatch_class(key)
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
    return _Release(hold_hooks(loop), loop, LINGER_S if linger is None else linger)


def hold_hooks(loop: asyncio.AbstractEventLoop) -> _LoopHooks:
    """``acquire_hooks`` without the object that gives them back, for a caller that gives
    them back itself, once, with ``hooks.let_go(loop, linger)`` (the middleware: one object
    fewer per traced request)."""
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
    return hooks


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
        hooks.let_go(self.loop, self.linger)


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
