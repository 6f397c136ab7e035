"""The records a trace is made of, and the recording core every hook calls.

    res = trace.add("fetch", trigger_id=1, stack_id=None, now=time.perf_counter_ns())
    trace.begin(res, now); trace.end(res, later); trace.settle(res, later, "ok")

``Resource`` is one record; ``_PyTraceCore`` the recording half of ``_model.Trace`` (with the
C accelerator built, both are its C forms, ``_speedups.Resource`` and ``TraceCore``).
Exports: AnnotationValue, Dropped, Resource, check_watched.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from ._failures import report
from ._stacks import capture

try:  # the optional C accelerator (see _speedups.c)
    from ._speedups import Resource as _CResource
    from ._speedups import TraceCore as _CTraceCore
except ImportError:  # pragma: no cover - built everywhere the tests run
    _CResource = _CTraceCore = None  # type: ignore[assignment,misc]

__all__ = ["AnnotationValue", "Dropped", "Resource", "check_watched"]

_now = time.perf_counter_ns
_ids_lock = threading.Lock()

AnnotationValue = str | int | float | bool | None


class Dropped:
    """Counts of what a trace left out because a cap was hit. The counts start as the class's
    zeros (no ``__init__`` to run for every trace) and become the instance's own when counted."""

    resources = 0
    annotations = 0
    callbacks = 0
    stacks = 0
    truncated = 0

    def to_dict(self) -> dict[str, int]:
        return {
            "resources": self.resources,
            "annotations": self.annotations,
            "callbacks": self.callbacks,
            "stacks": self.stacks,
            "truncatedValues": self.truncated,
        }


class Resource:
    """One async resource. ``callbacks`` is flat: start, end, start, end, ... (raw clock).

    Holds ints, strings, None and lists of ints only. With the C accelerator built, resources
    are ``_speedups.Resource``, the same record as a type the garbage collector does not track
    (a traced request makes one per resource, and none can be part of a cycle), whose
    ``callbacks`` list is made on first use.
    """

    __slots__ = (
        "annotation_count",
        "async_id",
        "awaited_by",
        "callbacks",
        "created_at",
        "settled_at",
        "stack_id",
        "state",
        "trigger_id",
        "type",
    )

    def __init__(
        self, async_id: int, trigger_id: int, type: str, stack_id: int | None, created_at: int
    ) -> None:
        self.async_id = async_id
        self.trigger_id = trigger_id
        self.type = type
        self.stack_id = stack_id
        self.created_at = created_at
        self.callbacks: list[int] = []
        self.settled_at: int | None = None
        self.state = "pending"
        self.annotation_count = 0
        self.awaited_by: list[int] | None = None

    def intervals(self) -> list[tuple[int, int | None]]:
        """Callback intervals as (start, end) pairs; end is None for a step still running."""
        cb = self.callbacks
        return [(cb[i], cb[i + 1] if i + 1 < len(cb) else None) for i in range(0, len(cb), 2)]

    def __repr__(self) -> str:
        return f"<Resource {self.async_id} {self.type} <-{self.trigger_id} {self.state}>"


_PyResource = Resource  # the pure-Python record, kept for tests that compare the two
if _CResource is not None and not TYPE_CHECKING:
    Resource = _CResource


def _check_watched_list(watched: list[tuple[Resource, Any]], now: int) -> None:
    for i in range(len(watched) - 1, -1, -1):
        if i >= len(watched):
            continue
        res, handle = watched[i]
        if res.settled_at is None:
            try:
                if not handle.cancelled():
                    continue
            except Exception as exc:
                report("timers", exc)
            else:
                res.settled_at, res.state = now, "cancelled"
        del watched[i]


def check_watched(trace: Any, res: Resource, now: int) -> None:
    """A step of ``res`` ended at ``now``: of the timers whose loop reports no cancel (uvloop's
    handles take no class of ours), watched in ``trace._watched``, those ``res`` made are asked
    whether they were cancelled (a sleep's, a deadline's: cancelled by the task that made
    them), all of them at a step of the root (what one task made and another cancelled is seen
    as the request resumes). Each cancelled one is settled ``cancelled`` now; each settled one
    is let go. The C core does the same in ``end()`` and a task's step."""
    watched: dict[int, list[tuple[Resource, Any]]] | None = trace._watched
    if not watched:
        return
    resources = trace.resources
    if resources and resources[0] is res:
        for each in list(watched.values()):
            _check_watched_list(each, now)
        return
    mine = watched.get(res.async_id)
    if mine is not None:
        _check_watched_list(mine, now)
        if not mine:
            watched.pop(res.async_id, None)


class _PyTraceCore:
    """The recording half of a trace: what every hook calls for every resource. With the C
    accelerator built, ``Trace`` stands on ``_speedups.TraceCore`` instead, the same methods
    in C; the tests hold the two to the same results. Limits are plain integers, copied from
    ``TraceLimits`` by ``Trace.__init__``."""

    __slots__ = (
        "_max_annotation_length",
        "_max_annotations",
        "_max_callbacks",
        "_max_resources",
        "_max_stacks",
        "_next_id",
        "_running",
        "_stack_ids",
        "_watched",
        "annotations",
        "closed",
        "dropped",
        "resources",
        "samples",
        "stack_depth",
        "stacks",
    )

    _max_annotation_length: int
    _max_annotations: int
    _max_callbacks: int
    _max_resources: int
    _max_stacks: int
    _next_id: int
    # (resource, thread ident) of the step running now, or None: see _watchdog
    _running: tuple[Resource, int] | None
    _stack_ids: dict[object, int]
    # timers whose loop reports no cancel (uvloop): their maker's async_id -> [(resource,
    # handle)]; see check_watched
    _watched: dict[int, list[tuple[Resource, Any]]] | None
    annotations: list[tuple[int, str, AnnotationValue]]
    closed: bool
    dropped: Dropped
    resources: list[Resource]
    # Where a long step on the loop was when the watchdog looked: (async_id, when, frames,
    # innermost first), or None when it never looked
    samples: list[tuple[int, int, tuple[str, ...]]] | None
    stack_depth: int
    stacks: list[tuple[str, ...]]

    def add(self, type: str, trigger_id: int, stack_id: int | None, now: int) -> Resource | None:
        """A new resource, or None when the resource cap is reached (counted as dropped)."""
        resources = self.resources
        if len(resources) >= self._max_resources:
            self.dropped.resources += 1
            return None
        with _ids_lock:  # a worker thread may add to the same trace (the C core holds the GIL)
            async_id = self._next_id
            self._next_id = async_id + 1
        res = Resource(async_id, trigger_id, type, stack_id, now)
        resources.append(res)
        return res

    def begin(self, res: Resource, now: int) -> None:
        """A callback of ``res`` starts running."""
        cb = res.callbacks
        if len(cb) < self._max_callbacks:
            cb.append(now)
        else:
            self.dropped.callbacks += 1

    def end(self, res: Resource, now: int) -> None:
        """The running callback of ``res`` returns (ignored if its start was dropped)."""
        cb = res.callbacks
        if len(cb) & 1:
            cb.append(now)
        if self._watched:
            check_watched(self, res, now)

    def settle(self, res: Resource, now: int, state: str) -> None:
        """``res`` reached its final state; only the first settlement counts."""
        if res.settled_at is None:
            res.settled_at = now
            res.state = state

    def annotate(self, res: Resource, key: str, value: AnnotationValue) -> None:
        if res.annotation_count >= self._max_annotations:
            self.dropped.annotations += 1
            return
        limit = self._max_annotation_length
        if isinstance(value, str):
            if len(value) > limit:
                value = value[:limit] + "…"
                self.dropped.truncated += 1
        elif value is not None and not isinstance(value, (int, float)):  # bool is an int
            value = repr(value)[:limit]
        res.annotation_count += 1
        self.annotations.append((res.async_id, key, value))

    def stack_id(self, key: object, frames: tuple[str, ...]) -> int | None:
        """The id of a stack in this trace's table, interned by ``key`` (any hashable)."""
        sid = self._stack_ids.get(key)
        if sid is None:
            if len(self.stacks) >= self._max_stacks:
                self.dropped.stacks += 1
                return None
            sid = len(self.stacks)
            self.stacks.append(frames)
            self._stack_ids[key] = sid
        return sid

    def new_resource(self, type: str, parent: Resource, skip: int) -> Resource | None:
        """A resource of ``type`` made now by ``parent``, with the creation stack that starts
        ``skip`` frames out from the calling frame (0: the caller itself)."""
        now = _now()
        sid = None
        if self.stack_depth:
            stack = capture(self.stack_depth, skip + 2)  # past capture() and this frame
            sid = self._stack_ids.get(stack)
            if sid is None:
                sid = self.stack_id(stack, stack.frames)
        return self.add(type, parent.async_id, sid, now)


if TYPE_CHECKING:
    _TraceCore = _PyTraceCore
else:
    _TraceCore = _PyTraceCore if _CTraceCore is None else _CTraceCore
