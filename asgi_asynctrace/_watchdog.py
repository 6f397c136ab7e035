"""The blocked-loop watchdog: where a traced request's step was while it held the loop, and
the garbage collections its steps paid for.

    watch(trace, after_ns=20_000_000)   # as the request starts (the middleware does this)
    unwatch(trace)                      # as it ends: its collections become "gc" resources
    trace.samples                       # [(async_id, when, frames), ...] or None

A step that runs long on the event loop holds up every request of the process. The trace
shows that it did (one long callback interval) but not where: the step's resource was created
somewhere else, long before. So while traced requests run, one thread of ours looks at the
step each of them is running (``TimedCoroutine`` and the timers' callbacks keep it in
``trace._running``); once that step has run ``after_ns``, it takes the stack of the thread
running it, and again at 2, 4, 8, ... times ``after_ns`` while the same step goes on (at most
``MAX_SAMPLES`` per trace). Each sample goes to ``trace.samples``; the analyzer names its first
frame of the app's own code in the blocked-loop finding, and the viewer shows the stacks.

What it costs: nothing for a request that is not traced, a dict entry per traced request, and
while traced requests run, a thread that sleeps without the GIL (``quiet_wait``, in the C
accelerator) until a step has run ``after_ns`` with no other starting or ending, and only then
takes the GIL to look: a busy loop of short steps never hands it over, nor does a steady
trickle of sampled requests (it takes the GIL to fall asleep only once no traced step has run
for a second). (Looking every 20 ms with the GIL took it from a busy loop each time, which
cost 1-2 % of the process's CPU with one request in a hundred traced. Without the
accelerator it still does.) A step blocked in
C code that holds the GIL is seen only once it lets go, by when it has ended: there is
nothing to sample then. The garbage collector is such a case, and is told apart by its own
callback (below). The thread starts with the first traced request and sleeps on an event a
second after the last one ended. A failure in it is counted and logged once
(``asgi_asynctrace.failure_counts()``), like every other. Exports: watch, unwatch,
MAX_SAMPLES, GC_MIN_NS.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Final

from ._failures import report
from ._stacks import frames_from

try:  # the C accelerator's sleep without the GIL, which wakes only for a long step
    from ._speedups import quiet_poke as _quiet_poke
    from ._speedups import quiet_wait as _quiet_wait
except ImportError:  # pragma: no cover - no accelerator, or built without atomics (MSVC)
    _quiet_wait = _quiet_poke = None  # type: ignore[assignment]
# The after_ns the thread's quiet_wait waits for now (None: not in one)
_waiting_after: int | None = None

if TYPE_CHECKING:
    from ._model import Resource, Trace

__all__ = ["GC_MIN_NS", "MAX_SAMPLES", "unwatch", "watch"]

MAX_SAMPLES: Final = 32
# Stacks of a blocked step are worth more frames than creation stacks: the blocking call is
# often deep in a library, under the app's own frame that made it.
_MIN_DEPTH: Final = 24
# After the last traced request ends, the thread keeps looking this long before it sleeps on
# its event, so a steady trickle of sampled requests does not wake it each time.
_LINGER_NS: Final = 1_000_000_000

_now = time.perf_counter_ns


class _Watch:
    """One trace's watch: its threshold, the step it last saw running, and the garbage
    collections that ran in its steps (recorded into the trace when the request ends)."""

    __slots__ = ("after", "due", "gcs", "res", "step")

    def __init__(self, after: int) -> None:
        self.after = after
        self.res: object = None  # the step last seen: its resource and its start's index
        self.step = -1
        self.due = 0  # when that step is next sampled
        # (resource whose step paid for it, start, end, generation, objects collected)
        self.gcs: list[tuple[Resource, int, int, int, int]] | None = None


_watched: dict[Trace, _Watch] = {}
_wake = threading.Event()
_thread: threading.Thread | None = None
_lock = threading.Lock()  # starting the thread, and its falling asleep


def watch(trace: Trace, after_ns: int) -> None:
    """Sample ``trace``'s steps that run ``after_ns`` or longer until ``unwatch(trace)``, and
    note the garbage collections its steps pay for."""
    _watched[trace] = _Watch(after_ns)
    if _waiting_after is not None and after_ns < _waiting_after:  # (set only with quiet_wait)
        _quiet_poke(True)  # the thread waits for longer steps than this trace's: it looks again
    if not _wake.is_set():  # the thread sleeps, or never started: wake it, the gc callback on
        try:
            _start()
        except Exception as exc:  # no thread to be had: the trace goes on without samples
            report("watchdog", exc)


def unwatch(trace: Trace) -> None:
    """Stop watching ``trace``; the collections its steps paid for become its ``gc``
    resources (here, on the request's own thread: never from inside the collector, which
    may run in the middle of any recording)."""
    w = _watched.pop(trace, None)
    if w is not None and w.gcs:
        try:
            for res, start, end, generation, collected in w.gcs:
                gc_res = trace.add("gc", res.async_id, None, start)
                if gc_res is None:  # over the resource cap (counted as dropped)
                    break
                trace.begin(gc_res, start)
                trace.end(gc_res, end)
                trace.settle(gc_res, end, "ok")
                trace.annotate(gc_res, "generation", generation)
                trace.annotate(gc_res, "collected", collected)
        except Exception as exc:
            report("watchdog-gc", exc)


# -- garbage collections -----------------------------------------------------------------------
# A collection runs in whatever thread allocates past the collector's threshold, holding the
# GIL throughout: a step of a traced request that triggers a full collection (40-50 ms for a
# large app's heap) blocks the loop, and the sampling thread cannot see it (it waits for the
# GIL). gc.callbacks says when each collection starts and stops; one of at least GC_MIN_NS,
# run by a traced request's step on this thread, is noted for that request. The callback is
# on gc.callbacks while the thread is awake: from a traced request's start until it sleeps, a
# second after the last one ended (not put on and taken off for each request: with no trace
# watched it returns at once).

#: Collections shorter than this are not recorded (a young generation's take microseconds).
GC_MIN_NS: Final = 1_000_000
_gc_started = 0


def _gc_watch(on: bool) -> None:
    try:
        if on and _on_gc not in gc.callbacks:
            gc.callbacks.append(_on_gc)
        elif not on and _on_gc in gc.callbacks:
            gc.callbacks.remove(_on_gc)
    except Exception as exc:
        report("watchdog-gc", exc)


def _on_gc(phase: str, info: dict[str, int]) -> None:
    global _gc_started
    if not _watched:
        return
    try:
        if phase == "start":
            _gc_started = _now()
            return
        now = _now()
        started = _gc_started
        if not started or now - started < GC_MIN_NS:
            return
        me = threading.get_ident()
        for w_trace, w in list(_watched.items()):
            running = w_trace._running
            if running is not None and running[1] == me:
                if w.gcs is None:
                    w.gcs = []
                entry = (running[0], started, now, info["generation"], info["collected"])
                w.gcs.append(entry)
    except Exception as exc:  # the collector ignores what a callback raises: we count it
        report("watchdog-gc", exc)


def _start() -> None:
    global _thread
    with _lock:
        _gc_watch(True)
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_run, name="asgi-asynctrace-watchdog", daemon=True)
            _thread.start()
        _wake.set()


def _fall_asleep() -> None:
    """Nothing watched for a while: the thread sleeps on its event, the gc callback off. A
    trace watched meanwhile either saw the event still set, and is seen here (the thread
    wakes again), or saw it clear, and woke the thread itself."""
    with _lock:
        _gc_watch(False)
        _wake.clear()
    if _watched:
        _start()


def _run() -> None:
    idle_since: int | None = None
    while True:
        _wake.wait()
        after = limit = 20_000_000
        try:
            now = _now()
            if _watched:
                idle_since = None
                pause, after = _look(now)
                limit = _LINGER_NS
            else:
                if idle_since is None:
                    idle_since = now
                elif now - idle_since >= _LINGER_NS:
                    _fall_asleep()
                    idle_since = None
                    continue
                pause = 20_000_000
                limit = max(_LINGER_NS - (now - idle_since), 1_000_000)
        except Exception as exc:  # never let it die: count, log once, go on
            report("watchdog", exc)
            pause = 20_000_000
        if _sleep(pause, after, limit) and not _watched:
            idle_since = _now() - _LINGER_NS  # no traced step for all that: as good as idle


def _sleep(pause: int, after: int, limit: int) -> bool:
    """Until the next look: ``pause`` nanoseconds; with the C accelerator, on without the GIL
    until a step has run long enough to be due for a sample, or no traced step has run for
    ``limit`` (then True: the process has gone quiet), so a busy loop of short steps, traced
    or not, never has to hand this thread the GIL (``quiet_wait`` in _speedups.c)."""
    if _quiet_wait is None:
        time.sleep(pause / 1e9)
        return False
    global _waiting_after
    try:
        pokes = _quiet_poke(False)  # read before saying what it waits for
        _waiting_after = after
        due = _quiet_wait(pause, after, limit, pokes)
        return not due and _quiet_poke(False) == pokes
    except Exception as exc:
        report("watchdog", exc)
        time.sleep(pause / 1e9)
        return False
    finally:
        _waiting_after = None


def _look(now: int) -> tuple[int, int]:
    """Sample every watched trace's step that is due; nanoseconds until the next is due, and
    the lowest threshold of the traces watched (none: never, the wait ends at its limit)."""
    pause, after = 20_000_000, 1 << 62
    for trace, w in list(_watched.items()):
        pause = min(pause, w.after)
        after = min(after, w.after)
        running = trace._running
        if running is None or trace.closed:
            continue
        res, thread = running
        callbacks = res.callbacks
        n = len(callbacks)
        if not n & 1:  # its start went over the cap: no start to measure from
            continue
        if w.res is not res or w.step != n:
            w.res, w.step, w.due = res, n, callbacks[-1] + w.after
        if now < w.due:
            pause = min(pause, w.due - now)
            continue
        w.due = callbacks[-1] + 2 * (now - callbacks[-1])  # 1, 2, 4, 8 ... times after_ns
        pause = min(pause, w.due - now)
        samples = trace.samples
        if samples is not None and len(samples) >= MAX_SAMPLES:
            continue
        frame = sys._current_frames().get(thread)
        if frame is None:
            continue
        frames = frames_from(frame, max(trace.stack_depth, _MIN_DEPTH))
        del frame
        # The same step still running after the walk: the stack was its own all along.
        still = trace._running
        if still is None or still[0] is not res or len(res.callbacks) != n or not frames:
            continue
        if samples is None:
            samples = trace.samples = []
        samples.append((res.async_id, now, frames))
    return max(pause, 1_000_000), after


def _forget_after_fork() -> None:
    """A forked child has no watchdog thread: the next traced request starts one."""
    global _thread, _wake, _lock
    _thread = None
    _wake = threading.Event()
    _lock = threading.Lock()
    _watched.clear()
    _gc_watch(False)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
