"""Thread-pool jobs of a traced request: submit, start in the worker, end.

    acquire()            # while the loop hooks are on (they do this)
    await asyncio.to_thread(work)      # recorded as a "thread" resource
    release()

Two doors lead into worker threads, and both are watched: ``ThreadPoolExecutor.submit``
(``loop.run_in_executor`` and ``asyncio.to_thread`` on any loop, uvloop included) and anyio's
worker threads (``anyio.to_thread.run_sync``, hence Starlette's ``run_in_threadpool``, sync
endpoints and FastAPI's sync dependencies). The job runs with its own resource current, so
what it records lands in the right trace, caused by the job. Both doors are the C dispatcher:
an untraced submit calls the original with no frame of ours.
Exports: acquire, release, wrap_job.
"""

from __future__ import annotations

import functools
import importlib
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextvars import Context
from typing import Any

from ._context import ACTIVE, Active, settle_from_exception
from ._failures import report
from ._tasks import dispatch

__all__ = ["acquire", "release", "wrap_job"]

_now = time.perf_counter_ns
_lock = threading.Lock()
_refs = 0
_original_submit = ThreadPoolExecutor.submit
_submit: Any = None  # what goes on ThreadPoolExecutor while the hooks are on
_anyio_original: Any = None
_anyio_backend: Any = None


def wrap_job(active: Active, fn: Callable[..., Any], skip: int = 3) -> Callable[..., Any]:
    """``fn`` recorded as a thread job of the trace in ``active`` (or ``fn`` if over the cap)."""
    trace = active[0]
    res = trace.new_resource("thread", active[1], skip - 1)
    if res is None:
        return fn
    target = fn
    inner: Context | None = None
    # asyncio.to_thread submits partial(context.run, func): the job runs inside that private
    # context, so our resource must be current there, not only around it.
    if isinstance(fn, functools.partial) and isinstance(
        getattr(fn.func, "__self__", None), Context
    ):
        inner = fn.func.__self__  # type: ignore[attr-defined]
        target = fn.args[0] if fn.args else fn
    trace.annotate(res, "function", _callable_name(target))
    state = (trace, res)
    if inner is not None:
        inner.run(ACTIVE.set, state)

    def asynctrace_thread_job(*args: Any, **kwargs: Any) -> Any:
        trace.begin(res, _now())
        token = ACTIVE.set(state)
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            now = _now()
            trace.end(res, now)
            settle_from_exception(trace, res, now, exc)
            raise
        finally:
            ACTIVE.reset(token)
        now = _now()
        trace.end(res, now)
        trace.settle(res, now, "ok")
        return result

    return asynctrace_thread_job


def _callable_name(fn: Any) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    name = getattr(fn, "__qualname__", None)
    return name if isinstance(name, str) else type(fn).__qualname__


def _traced_submit(self: ThreadPoolExecutor, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
    active = ACTIVE.get()
    if active is not None and not active[0].closed:
        try:
            fn = wrap_job(active, fn)
        except Exception as exc:
            report("thread-submit", exc)
    return _original_submit(self, fn, *args, **kwargs)


async def _traced_run_sync_in_worker_thread(
    cls: Any, func: Callable[..., Any], args: tuple[Any, ...], *rest: Any, **kwargs: Any
) -> Any:
    active = ACTIVE.get()
    if active is not None and not active[0].closed:
        try:
            func = wrap_job(active, func)
        except Exception as exc:
            report("anyio-thread", exc)
    return await _anyio_original.__func__(cls, func, args, *rest, **kwargs)


def _patch_anyio() -> None:
    """Patch anyio's asyncio backend when the app uses anyio (we never import anyio itself)."""
    global _anyio_original, _anyio_backend
    if _anyio_backend is not None or "anyio" not in sys.modules:
        return
    # anyio loads its backend on first use, which may be inside this very request.
    module = sys.modules.get("anyio._backends._asyncio") or importlib.import_module(
        "anyio._backends._asyncio"
    )
    backend = getattr(module, "AsyncIOBackend", None)
    if backend is None:
        return
    original = backend.__dict__.get("run_sync_in_worker_thread")
    if not isinstance(original, classmethod):
        return  # an anyio we do not know: leave it alone
    _anyio_original = backend.run_sync_in_worker_thread
    _anyio_backend = backend
    # Outside traced requests anyio's own method runs, called from C with no frame of ours.
    backend.run_sync_in_worker_thread = classmethod(
        dispatch(_anyio_original.__func__, _traced_run_sync_in_worker_thread)
    )


def prepare() -> None:
    """Load anyio's asyncio backend now, when the app already imported anyio (Starlette
    does), so that the first traced request does not: importing it takes about 10 ms, which
    that request would wait for and its trace would show as a gap before its first step."""
    if "anyio" in sys.modules and "anyio._backends._asyncio" not in sys.modules:
        try:
            importlib.import_module("anyio._backends._asyncio")
        except Exception as exc:  # an anyio we do not know: patched (or not) as before
            report("anyio-patch", exc)


def _unpatch_anyio() -> None:
    global _anyio_original, _anyio_backend
    if _anyio_backend is not None:
        _anyio_backend.run_sync_in_worker_thread = classmethod(_anyio_original.__func__)
        _anyio_backend = _anyio_original = None


def acquire() -> None:
    global _refs, _submit
    with _lock:
        _refs += 1
        if _refs == 1:
            if _submit is None:
                # Outside traced requests the executor's own submit runs, called from C.
                _submit = dispatch(_original_submit, _traced_submit)
            ThreadPoolExecutor.submit = _submit  # type: ignore[method-assign]
        try:
            _patch_anyio()
        except Exception as exc:
            report("anyio-patch", exc)


def release() -> None:
    global _refs
    with _lock:
        _refs -= 1
        if _refs == 0:
            if ThreadPoolExecutor.submit is _submit:
                ThreadPoolExecutor.submit = _original_submit  # type: ignore[method-assign]
            _unpatch_anyio()
