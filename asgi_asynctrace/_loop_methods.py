"""Loop methods replaced on the loop's class, shared by reference count by its loops.

    key = patch_on_class(loop, "create_future", make, always=False)   # None: not on the class
    ...
    unpatch_class(key)                                                  # the last one restores

Exports: LoopPatch, NOT_NEEDED, patch_on_class, unpatch_class.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from ._tasks import dispatch

_CTaskCall: Callable[..., Any] | None
try:  # the optional C accelerator (see _speedups.c)
    from ._speedups import TaskCall as _CTaskCall
except ImportError:  # pragma: no cover - built everywhere the tests run
    _CTaskCall = None

__all__ = ["NOT_NEEDED", "LoopPatch", "patch_on_class", "unpatch_class"]

#: make(original) -> what runs in place of a loop method while the hooks are on, called as
#: ``method(loop, *args, **kwargs)``; ``original`` is called the same way, loop first. None:
#: this loop's method needs no patch (it calls another patched method that records it).
LoopPatch = Callable[[Callable[..., Any]], "Callable[..., Any] | None"]
#: What patch_on_class says of a method whose patch declined it: leave the method alone.
NOT_NEEDED: Any = ("", "")
_MISSING: Any = object()


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


def patch_on_class(loop: asyncio.AbstractEventLoop, name: str, make: LoopPatch,
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
        return NOT_NEEDED  # type: ignore[no-any-return]
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


def unpatch_class(key: tuple[type, str]) -> None:
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
