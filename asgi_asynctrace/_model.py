"""The trace model: resources, stacks, annotations and their JSON form (format version 1).

    trace = Trace.start(request={"method": "GET", "path": "/items"})
    child = trace.add("fetch", trigger_id=1, stack_id=None, now=time.perf_counter_ns())
    data = trace.to_json()          # bytes, format v1

Knows nothing of asyncio, ASGI or any instrumented library. Times are kept as raw
``perf_counter_ns`` readings and turned into "ns since the request started" on the way out.
Exports: Resource, Trace, TraceLimits, Dropped, RESOURCE_TYPES, STATES, frame_origin.
"""

from __future__ import annotations

import operator
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

import orjson

from ._failures import report
from ._stacks import capture

_c_resources_json: Callable[..., bytes] | None
_c_annotations_json: Callable[..., bytes] | None
_c_stacks_json: Callable[..., bytes] | None
_c_in_order: Callable[[list[Any]], bool | None] | None
_c_trace_json: Callable[..., bytes] | None
try:  # the optional C accelerator (see _speedups.c); resource_dicts is the same in Python
    from ._speedups import Resource as _CResource
    from ._speedups import TraceCore as _CTraceCore
    from ._speedups import annotations_json as _c_annotations_json
    from ._speedups import in_order as _c_in_order
    from ._speedups import resources_json as _c_resources_json
    from ._speedups import stacks_json as _c_stacks_json
    from ._speedups import start_trace as _c_start_trace
    from ._speedups import trace_json as _c_trace_json
except ImportError:  # pragma: no cover - built everywhere the tests run
    _c_resources_json = _c_annotations_json = _CResource = _CTraceCore = None  # type: ignore[assignment,misc]
    _c_start_trace = None  # type: ignore[assignment]
    _c_in_order = _c_stacks_json = _c_trace_json = None

__all__ = [
    "RESOURCE_TYPES",
    "STATES",
    "AnnotationValue",
    "Dropped",
    "FrameOrigin",
    "Resource",
    "Trace",
    "TraceLimits",
    "frame_origin",
]

FORMAT_VERSION: Final = 1
_now = time.perf_counter_ns
_ids_lock = threading.Lock()

RESOURCE_TYPES: Final = frozenset(
    {
        "root", "task", "future", "timer", "thread", "fetch",
        "cache-get", "cache-put", "cache-delete",
        "kv-get", "kv-put", "kv-delete", "kv-list", "kv-pipeline", "kv-command",
        "db-query", "queue-send", "queue-receive",
        "stream-read", "stream-write", "websocket", "remote-root", "gc", "other",
    }
)  # fmt: skip
STATES: Final = ("ok", "error", "cancelled", "pending")

AnnotationValue = str | int | float | bool | None
FrameOrigin = Literal["app", "dependency", "runtime"]


@dataclass(frozen=True, slots=True)
class TraceLimits:
    """Hard caps per trace; what goes over is dropped and counted in ``dropped``."""

    max_resources: int = 20_000
    max_callbacks_per_resource: int = 2_000
    max_annotations_per_resource: int = 32
    max_annotation_length: int = 512
    max_stack_depth: int = 16
    max_stacks: int = 2_000

    def __post_init__(self) -> None:
        for name in self.__slots__:
            value = getattr(self, name)
            least = 0 if name == "max_stack_depth" else 1  # 0: capture no stacks at all
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"TraceLimits.{name} must be an int >= {least}, got {value!r}")


_DEFAULT_LIMITS: Final = TraceLimits()


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


# Trace ids drawn from the OS 256 at a time: one system call for many requests. list.pop()
# is atomic, so threads starting traces at once never share an id.
_trace_ids: list[str] = []


def _new_trace_id() -> str:
    # 16 random bytes, the size of a W3C trace-id, so traces can be joined with other systems.
    try:
        return _trace_ids.pop()
    except IndexError:
        drawn = os.urandom(16 * 256).hex()
        _trace_ids.extend(drawn[i : i + 32] for i in range(32, len(drawn), 32))
        return drawn[:32]


def _machine_limits(limits: TraceLimits) -> tuple[int, int, int, int, int, int]:
    """The limits the recording methods read, as machine integers (TraceLimits is frozen; a
    limit past sys.maxsize is no limit at all), worked out once per TraceLimits."""
    kept = _limit_ints.get(id(limits))
    if kept is not None and kept[0] is limits:
        return kept[1]
    m = sys.maxsize
    ints = (min(limits.max_resources, m), min(limits.max_annotations_per_resource, m),
            min(limits.max_annotation_length, m), min(2 * limits.max_callbacks_per_resource, m),
            min(limits.max_stacks, m), min(limits.max_stack_depth, m))  # fmt: skip
    if len(_limit_ints) >= 64:
        _limit_ints.clear()
    _limit_ints[id(limits)] = (limits, ints)  # holding the limits: their id is not reused
    return ints


_limit_ints: dict[int, tuple[TraceLimits, tuple[int, int, int, int, int, int]]] = {}


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


class Trace(_TraceCore):
    """All that one request did asynchronously.

    Recording methods take the clock reading from the caller, so a hook reads the clock once.
    They are safe to call from worker threads: each runs under the GIL without giving it up
    (in C), or is a single list operation on the shared state (in Python).
    """

    __slots__ = (
        "ended_at",
        "finishers",
        "limits",
        "origin",
        "propagate_to",
        "record_futures",
        "request",
        "started_at_unix_ns",
        "trace_id",
    )

    def __init__(
        self,
        *,
        trace_id: str | None = None,
        request: dict[str, Any] | None = None,
        origin: int = 0,
        started_at_unix_ns: int = 0,
        limits: TraceLimits | None = None,
    ) -> None:
        if not trace_id:
            try:  # _new_trace_id(), without its frame
                trace_id = _trace_ids.pop()
            except IndexError:
                trace_id = _new_trace_id()
        self.trace_id = trace_id
        self.request: dict[str, Any] = request if request is not None else {}
        self.origin = origin
        self.started_at_unix_ns = started_at_unix_ns
        self.ended_at: int | None = None
        self.limits = limits = limits or _DEFAULT_LIMITS
        kept = _limit_ints.get(id(limits))  # _machine_limits(limits), without its frame
        (
            self._max_resources,
            self._max_annotations,
            self._max_annotation_length,
            self._max_callbacks,
            self._max_stacks,
            self.stack_depth,
        ) = kept[1] if kept is not None and kept[0] is limits else _machine_limits(limits)
        self._next_id = 1
        self.resources: list[Resource] = []
        self.stacks: list[tuple[str, ...]] = []
        self.annotations: list[tuple[int, str, AnnotationValue]] = []
        self.dropped = Dropped()
        self.closed = False
        self.record_futures = True
        # host or host:port -> the X-Async-Trace value an outgoing call there carries, so the
        # service behind it traces that request too and names this trace as its upstream.
        self.propagate_to: dict[str, str] = {}
        # Called as fn(trace, now) when the request ends, before the trace closes: for
        # recorders that can only settle their resources then (a cancelled uvloop timer).
        self.finishers: list[Callable[[Trace, int], None]] = []
        self._stack_ids: dict[object, int] = {}
        self._watched = None
        self._running = None
        self.samples = None

    @classmethod
    def start(
        cls,
        *,
        request: dict[str, Any] | None = None,
        limits: TraceLimits | None = None,
        trace_id: str | None = None,
    ) -> Trace:
        """A trace whose clock starts now, holding its root resource (id 1)."""
        origin = time.perf_counter_ns()
        if _c_start_trace is not None and cls.__init__ is _TRACE_INIT and cls.add is _CORE_ADD:
            # What the lines below make, in one C call (see start_trace in _speedups.c)
            if not trace_id:
                try:
                    trace_id = _trace_ids.pop()
                except IndexError:
                    trace_id = _new_trace_id()
            limits = limits or _DEFAULT_LIMITS
            kept = _limit_ints.get(id(limits))
            ints = kept[1] if kept is not None and kept[0] is limits else _machine_limits(limits)
            made = _c_start_trace(cls, trace_id, request if request is not None else {}, limits,
                                  ints, origin, time.time_ns(), Dropped)  # fmt: skip
            if made is not NotImplemented:  # (a class on the Python core: made below)
                return made  # type: ignore[no-any-return]
        trace = cls(
            trace_id=trace_id,
            request=request,
            origin=origin,
            started_at_unix_ns=time.time_ns(),
            limits=limits,
        )
        trace.add("root", 0, None, origin)
        return trace

    @property
    def root(self) -> Resource:
        return self.resources[0]

    def finish(self, now: int, state: str = "ok") -> None:
        """End the request: close the trace to further recording.

        The root ends with the request, whatever settled it before (its last step does,
        as for any resource): the request's own outcome is its final word.
        """
        if self.ended_at is None:
            self.ended_at = now
        finishers, self.finishers = self.finishers, []
        for finisher in finishers:
            try:
                finisher(self, now)
            except Exception as exc:
                report("trace-finisher", exc)
        root = self.root
        root.settled_at = now
        root.state = state
        self.closed = True

    # -- reading -----------------------------------------------------------------------------

    @property
    def duration_ns(self) -> int:
        end = self.ended_at if self.ended_at is not None else time.perf_counter_ns()
        return end - self.origin

    def annotations_of(self, async_id: int) -> dict[str, AnnotationValue]:
        return {k: v for rid, k, v in self.annotations if rid == async_id}

    def samples_by_resource(self) -> dict[int, list[tuple[int, tuple[str, ...]]]]:
        """The watchdog's samples by the resource whose step they were taken in: async_id ->
        [(when, frames)], in the order taken."""
        out: dict[int, list[tuple[int, tuple[str, ...]]]] = {}
        for rid, at, frames in self.samples or ():
            out.setdefault(rid, []).append((at, frames))
        return out

    def to_dict(self) -> dict[str, Any]:
        """The trace in format v1 (a plain dict, ready for any JSON encoder)."""
        return self._as_dict(resource_dicts(self._ordered(), self.origin))

    def to_json(self) -> bytes:
        """The trace in format v1 as JSON: ``orjson.dumps(self.to_dict())``, byte for byte.

        With the C accelerator the resources and annotations are written straight from the
        model, with no dict, list or int made for them: several times faster, and nothing for
        the garbage collector on a request's way out. A failure there is counted and the
        Python path used.
        """
        return self._json(True)

    def json_without_stacks(self) -> bytes:
        """``to_json()`` but for its ``stackTraces`` entry: for the response header, which
        takes the stack table from a cache of its compressed form (see ``stack_table_json``)."""
        return self._json(False)

    def stack_table_json(self) -> bytes:
        """The ``stackTraces`` array as JSON, as ``to_json()`` writes it."""
        accelerated: Exception | None = None
        if _c_stacks_json is not None:
            try:
                if len(_frames_json) > _MAX_FRAMES_JSON:
                    _frames_json.clear()
                return _c_stacks_json(self.stacks, _frames_json, orjson.dumps)
            except Exception as exc:
                accelerated = exc
        table: list[dict[str, Any]] = [
            {"id": i, "frames": list(f)} for i, f in enumerate(self.stacks)
        ]
        try:
            data = orjson.dumps(table)
        except orjson.JSONEncodeError as exc:  # a frame JSON cannot hold: as to_json() does
            report("serialize", exc)
            for entry in table:
                entry["frames"] = [_json_safe(f) for f in entry["frames"]]
            return orjson.dumps(table)
        if accelerated is not None:
            report("serialize-accelerated", accelerated)
        return data

    def _json(self, with_stacks: bool) -> bytes:
        ordered = self._ordered()
        accelerated: Exception | None = None
        if _c_trace_json is not None:
            try:
                dumps = orjson.dumps
                strings = _json_strings
                if len(strings) > _MAX_JSON_STRINGS:
                    strings.clear()
                if len(_frames_json) > _MAX_FRAMES_JSON:
                    _frames_json.clear()
                # One buffer: the fields before "resources" and the dropped counts from
                # orjson, everything else written by C straight from the model.
                head = dumps(self._head(self.request))
                data = _c_trace_json(
                    head, ordered, self.origin, _SLOTS, self.stacks if with_stacks else None,
                    _frames_json, self.annotations, dumps(self.dropped.to_dict()), dumps,
                    strings,
                )  # fmt: skip
                if self.samples:  # rare (a step that blocked the loop): after "dropped"
                    data = b"".join((data[:-1], b',"samples":', self._samples_json(), b"}"))
                return data
            except Exception as exc:
                accelerated = exc
        no_stacks = None if with_stacks else ()
        out = self._as_dict(resource_dicts(ordered, self.origin), stacks=no_stacks)
        if not with_stacks:
            del out["stackTraces"]
        try:
            data = orjson.dumps(out)
        except orjson.JSONEncodeError as exc:
            # A value JSON cannot hold (a string with lone surrogates, an int beyond 64 bits):
            # written in a form it can, rather than losing the trace.
            report("serialize", exc)
            out = self._as_dict(resource_dicts(ordered, self.origin), stacks=no_stacks, safe=True)
            if not with_stacks:
                del out["stackTraces"]
            return orjson.dumps(out)
        if accelerated is not None:  # the C writer failed where Python did not: its bug
            report("serialize-accelerated", accelerated)
        return data

    def _ordered(self) -> list[Resource]:
        ordered = self.resources
        return sorted(ordered, key=_ID) if self._out_of_order() else ordered

    def _as_dict(
        self, resources: Any, annotations: Any = None, stacks: Any = None, safe: bool = False
    ) -> dict[str, Any]:
        if annotations is None:
            annotations = [{"asyncId": a, "key": k, "value": v} for a, k, v in self.annotations]
        if stacks is None:
            stacks = [{"id": i, "frames": list(f)} for i, f in enumerate(self.stacks)]
        out = {
            **self._head(dict(self.request)),
            "resources": resources,
            "stackTraces": stacks,
            "annotations": annotations,
            "dropped": self.dropped.to_dict(),
        }
        if self.samples:
            out["samples"] = self._sample_dicts()
        if safe:
            for a in annotations:
                a["key"], a["value"] = _json_safe(a["key"]), _json_safe(a["value"])
            out["request"] = {k: _json_safe(v) for k, v in out["request"].items()}
            for stack in out["stackTraces"]:
                stack["frames"] = [_json_safe(f) for f in stack["frames"]]
            for r in resources:
                r["type"] = _json_safe(r["type"])
            for sample in out.get("samples", ()):
                sample["frames"] = [_json_safe(f) for f in sample["frames"]]
        return out

    def _sample_dicts(self) -> list[dict[str, Any]]:
        """``samples`` in format v1: each with its time from the request's start."""
        o = self.origin
        return [
            {"asyncId": rid, "at": at - o, "frames": list(frames)}
            for rid, at, frames in self.samples or ()
        ]

    def _samples_json(self) -> bytes:
        dicts = self._sample_dicts()
        try:
            return orjson.dumps(dicts)
        except orjson.JSONEncodeError:  # a frame JSON cannot hold: as _as_dict(safe=True)
            for sample in dicts:
                sample["frames"] = [_json_safe(f) for f in sample["frames"]]
            return orjson.dumps(dicts)

    def _head(self, request: dict[str, Any]) -> dict[str, Any]:
        """The fields of format v1 before "resources", in their order."""
        return {
            "version": FORMAT_VERSION,
            "traceId": self.trace_id,
            "request": request,
            "startedAtUnixNs": self.started_at_unix_ns,
            "requestDurationNs": self.duration_ns,
        }

    def _out_of_order(self) -> bool:
        if _c_in_order is not None:
            known = _c_in_order(self.resources)
            if known is not None:
                return not known
        ids = list(map(_ID, self.resources))
        return ids != sorted(ids)

    def __repr__(self) -> str:
        return f"<Trace {self.trace_id} {len(self.resources)} resources>"

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickling and copying, whichever recording core the trace stands on: every field but
        the live request's (the stack index, keyed by cached code locations, and the
        finishers), which a copy starts afresh."""
        state = {name: getattr(self, name) for name in _TRACE_FIELDS if hasattr(self, name)}
        return _rebuild_trace, (type(self), state)


# Trace.start makes a trace in one C call when the class's __init__ and add are these.
_TRACE_INIT: Final = Trace.__init__
_CORE_ADD: Final = Trace.add


def _rebuild_trace(cls: type[Trace], state: dict[str, Any]) -> Trace:
    trace = cls.__new__(cls)
    for name, value in state.items():
        setattr(trace, name, value)
    trace._stack_ids = {}
    trace._watched = None
    trace._running = None
    trace.finishers = []
    return trace


_TRACE_FIELDS: Final = tuple(
    name
    for name in (*_PyTraceCore.__slots__, *Trace.__slots__)
    if name not in ("_running", "_stack_ids", "_watched", "finishers")
)


def resource_dicts(ordered: list[Resource], o: int) -> list[dict[str, Any]]:
    """Resources as format-v1 objects. (A C version measured no faster: building the dicts
    and ints is the cost, in either language.)"""
    resources: list[dict[str, Any]] = []
    add = resources.append
    # One pass, locals only: this runs once per traced request over every resource.
    for r in ordered:
        cb = r.callbacks
        if cb:
            n = len(cb)
            pairs: list[list[int | None]] = [[cb[i] - o, cb[i + 1] - o] for i in range(0, n - 1, 2)]
            if n & 1:
                pairs.append([cb[-1] - o, None])
            first: int | None = cb[0] - o
            last: int | None = cb[n - 1] - o if not n & 1 else (cb[n - 2] - o if n > 1 else None)
        else:
            pairs, first, last = [], None, None
        settled = r.settled_at
        item = {
            "asyncId": r.async_id,
            "triggerId": r.trigger_id,
            "type": r.type,
            "stackTraceId": r.stack_id,
            "createdAt": r.created_at - o,
            "callbackStartedAt": first,
            "callbackEndedAt": last,
            "destroyedAt": settled - o if settled is not None else None,
            "callbacks": pairs,
            "state": r.state,
        }
        if r.awaited_by:
            item["awaitedBy"] = list(r.awaited_by)
        add(item)
    return resources


# What the C writer reads of each resource, in the order it expects (the C record's
# callbacks list at its raw field, which is empty until first used).
_SLOTS: Final = tuple(
    vars(Resource)[name]
    for name in ("async_id", "trigger_id", "type", "stack_id", "created_at",
                 "callbacks" if Resource is _PyResource else "_callbacks",
                 "settled_at", "state", "awaited_by")
)  # fmt: skip


_ID: Final = operator.attrgetter("async_id")
# Types, states and annotation keys as JSON, for the C writer: a few dozen in a real app.
_json_strings: dict[str, bytes] = {}
_MAX_JSON_STRINGS: Final = 4096
# Each distinct stack's frames as JSON, written once by the C writer: call sites repeat across
# requests. Keyed by the frames tuple's identity (the stack cache hands out one per call
# site); the entry holds the tuple, so its id cannot be reused while the entry lives.
_frames_json: dict[int, tuple[tuple[str, ...], bytes]] = {}
_MAX_FRAMES_JSON: Final = 20_000


def _json_safe(value: Any) -> Any:
    """``value`` in a form JSON holds: lone surrogates escaped, ints beyond 64 bits as text."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        return str(value)
    return value


def frame_origin(frame: str) -> FrameOrigin:
    """Whose code a formatted frame is: the app's, a dependency's, or the runtime's.

    Stacks spell dependency paths from ``site-packages/`` and standard-library paths from
    ``<stdlib>/``; every other path is the app's (relative to its working directory).
    """
    _, _, where = frame.rpartition(" @ ")
    if where.startswith("site-packages/"):
        return "dependency"
    if where.startswith("<"):
        return "runtime"
    return "app"
