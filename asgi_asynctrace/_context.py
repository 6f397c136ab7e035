"""Which trace, and which resource in it, the running code belongs to.

    async with start_resource("cache-get", key=key) as scope:
        value = await backend.get(key)
        scope.annotate("hit", value is not None)

One ContextVar holds (trace, current resource); it follows tasks, callbacks and thread jobs,
so concurrent requests never share a "current id". Outside a traced request every helper
here is a single ContextVar read and does nothing. Instrumentation records a library's async
call with ``record_call(type, call, notes, done)`` (in C when the accelerator is built).
Exports: current_trace, current_resource, annotate, start_resource, ResourceScope, record_call,
call_recorder.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import re
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextvars import ContextVar, Token
from types import TracebackType
from typing import Any, Final, TypeVar, cast

from ._failures import report
from ._model import AnnotationValue, Resource, Trace

__all__ = [
    "ResourceScope",
    "annotate",
    "call_recorder",
    "current_resource",
    "current_trace",
    "found",
    "keyed_recorder",
    "record_call",
    "start_resource",
]

Active = tuple[Trace, Resource]

ACTIVE: Final[ContextVar[Active | None]] = ContextVar("asgi_asynctrace.active", default=None)

_now = time.perf_counter_ns
_F = TypeVar("_F", bound=Callable[..., Any])
_TYPE_NAME: Final = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
_known_types: set[str] = set()


def current_trace() -> Trace | None:
    """The trace of the request this code runs for, or None when it is not traced."""
    active = ACTIVE.get()
    return active[0] if active is not None else None


def current_resource() -> Resource | None:
    """The resource this code runs inside (the root, a task, a thread job, a scope)."""
    active = ACTIVE.get()
    return active[1] if active is not None else None


def annotate(key: str, value: AnnotationValue) -> None:
    """Label the current resource, e.g. ``annotate("user", user_id)``; no-op when untraced."""
    active = ACTIVE.get()
    if active is not None and not active[0].closed:
        try:
            active[0].annotate(active[1], key, value)
        except Exception as exc:
            report("annotate", exc)


def new_resource(type: str, trace: Trace, parent: Resource, skip: int = 2) -> Resource | None:
    """Record a resource created now by ``parent``, with the caller's caller's stack
    (``Trace.new_resource``, whose ``skip`` counts from its own caller: this frame)."""
    return trace.new_resource(type, parent, skip)


def settle_from_exception(trace: Trace, res: Resource, now: int, exc: BaseException) -> None:
    if isinstance(exc, asyncio.CancelledError):
        trace.settle(res, now, "cancelled")
    else:
        trace.settle(res, now, "error")
        trace.annotate(res, "error", type(exc).__qualname__)


def check_type(type: str) -> None:
    if type not in _known_types:
        if not isinstance(type, str) or not _TYPE_NAME.fullmatch(type):
            raise ValueError(f"resource type must be kebab-case like 'cache-get', got {type!r}")
        _known_types.add(type)


class ResourceScope:
    """A resource around a block: created on entry, settled on exit (ok, error or cancelled).

    Use it as ``with``, ``async with`` or a decorator. Code inside runs with this resource
    as its current one, so what it starts is recorded as caused by it.
    """

    __slots__ = ("_annotations", "_res", "_token", "_trace", "_type")

    def __init__(self, type: str, /, **annotations: AnnotationValue) -> None:
        check_type(type)
        self._type = type
        self._annotations = annotations
        self._trace: Trace | None = None
        self._res: Resource | None = None
        self._token: Token[Active | None] | None = None

    @property
    def resource(self) -> Resource | None:
        """The recorded resource, or None when the request is not traced (or over its cap)."""
        return self._res

    def annotate(self, key: str, value: AnnotationValue) -> None:
        if self._res is not None and self._trace is not None:
            try:
                self._trace.annotate(self._res, key, value)
            except Exception as exc:
                report("annotate", exc)

    def __enter__(self) -> ResourceScope:
        # The path every instrumentation takes: one C call records the resource and its stack.
        active = ACTIVE.get()
        if active is None:
            return self
        trace = active[0]
        if trace.closed:
            return self
        try:
            res = trace.new_resource(self._type, active[1], 1)  # the stack from our caller
            if res is not None:
                if self._annotations:
                    for key, value in self._annotations.items():
                        trace.annotate(res, key, value)
                self._trace = trace
                self._res = res
                self._token = ACTIVE.set((trace, res))
        except Exception as exc:
            report("start_resource", exc)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        res = self._res
        if res is None:
            return
        try:
            if self._token is not None:
                ACTIVE.reset(self._token)
            trace = cast(Trace, self._trace)
            if exc is None:
                if res.settled_at is None:  # Trace.settle, inlined
                    res.settled_at = _now()
                    res.state = "ok"
            else:
                settle_from_exception(trace, res, _now(), exc)
        except Exception as failure:
            report("start_resource", failure)

    async def __aenter__(self) -> ResourceScope:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def __call__(self, fn: _F) -> _F:
        """Decorate a function: each call records its own resource."""
        rtype, annotations = self._type, self._annotations
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with ResourceScope(rtype, **annotations):
                    return await cast(Callable[..., Awaitable[Any]], fn)(*args, **kwargs)

            return cast(_F, async_wrapper)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with ResourceScope(rtype, **annotations):
                return fn(*args, **kwargs)

        return cast(_F, wrapper)


def start_resource(type: str, /, **annotations: AnnotationValue) -> ResourceScope:
    """Record a resource of ``type`` (e.g. "cache-get") around a block, awaitable or function.

    Annotations given here are recorded at creation; add more with ``scope.annotate()``.
    """
    return ResourceScope(type, **annotations)


_T = TypeVar("_T")
#: done(result) -> annotations to add from the call's result (or None)
Done = Callable[[Any], "dict[str, Any] | None"]

_CScopedCall: Any
_CKeyedCall: Any
_c_found: Any
try:  # the optional C accelerator: ScopedCall is record_call's Python form below, in C
    from ._speedups import KeyedCall as _CKeyedCall
    from ._speedups import ScopedCall as _CScopedCall
    from ._speedups import found as _c_found
except ImportError:  # pragma: no cover - built everywhere the tests run
    _CScopedCall = _CKeyedCall = _c_found = None
SCOPED_CALL_IN_C = _CScopedCall is not None
_scoped_call_in_c = SCOPED_CALL_IN_C  # False: the Python form (tests run both)


def _found(result: object) -> dict[str, Any]:
    return {"hit": result is not None}


#: The ``done`` of a read: ``{"hit": result is not None}``. In C with the accelerator, where
#: a recorded call given this one annotates the hit itself, with no call and no dict.
found: Done = _c_found or _found


def record_call(
    type: str, awaitable: Awaitable[_T], notes: dict[str, Any], done: Done | None
) -> Coroutine[Any, Any, _T]:
    """``await awaitable`` recorded as a resource of ``type``: how instrumentation records a
    library's async call. The resource is made when the call is first awaited (its stack from
    the awaiting frame), carries ``notes`` and is the current resource while the call runs;
    ``done(result)`` may add annotations from the result (a failure there is counted, the
    result still returned), and the resource settles ok, cancelled or error as the call ends.
    With the accelerator, a C awaitable with no frame of ours in the await chain."""
    if _scoped_call_in_c:
        return _CScopedCall(ACTIVE, type, awaitable, notes, done)  # type: ignore[no-any-return]
    return _record_call(type, awaitable, notes, done)


def call_recorder() -> Callable[[str, Awaitable[Any], dict[str, Any], Done | None], Any]:
    """``record_call`` as instrumentation keeps it for its hot path, asked for when it is
    installed: with the accelerator, the C form bound to the context variable, so a recorded
    call runs no Python frame of ours (``record_call`` itself is one)."""
    if _scoped_call_in_c:
        return functools.partial(_CScopedCall, ACTIVE)
    return _record_call


def keyed_recorder(
    type: str, op: str, original: Callable[..., Any], fallback: Callable[..., Any],
    backends: dict[type, str], done: Done | None, where: str, ttl_at: int = -1,
) -> Callable[..., Any] | None:  # fmt: skip
    """A keyed library method's record with no Python frame, or None without the accelerator.

    Called as ``original(self, key, ...)`` is: when the key is given by position and
    ``backends`` names the class of ``self``, it returns the library's call recorded as
    ``record_call(type, call, {"backend": backends[cls], "op": op, "key": str(key)}, done)``,
    with ``"ttl"`` when ``ttl_at`` >= 0 and a number is given as ``ttl=`` or at that position
    (``self`` is 0); any other call goes to ``fallback``, the instrumentation's Python form of
    the same record (which is where a class new to ``backends`` gets its name). A failure of
    ours is counted under ``where`` and leaves that call unrecorded."""
    if not _scoped_call_in_c or _CKeyedCall is None:
        return None
    keyed = _CKeyedCall(ACTIVE, type, op, original, fallback, backends, done, where, ttl_at)
    return keyed  # type: ignore[no-any-return]


async def _record_call(
    type: str, awaitable: Awaitable[_T], notes: dict[str, Any], done: Done | None
) -> _T:
    with ResourceScope(type, **notes) as scope:
        result = await awaitable
        if done is not None and scope._res is not None:
            try:
                extra = done(result)
                for key, value in (extra or {}).items():
                    scope.annotate(key, value)
            except Exception as exc:
                report("start_resource", exc)
        return result


if _CScopedCall is not None:
    import collections.abc

    collections.abc.Coroutine.register(_CScopedCall)
