"""The trace model: resources, stacks, annotations and their JSON form (format version 1).

    trace = Trace.start(request={"method": "GET", "path": "/items"})
    child = trace.add("fetch", trigger_id=1, stack_id=None, now=time.perf_counter_ns())
    data = trace.to_json()          # bytes, format v1

Knows nothing of asyncio, ASGI or any instrumented library. Times are kept as raw
``perf_counter_ns`` readings and turned into "ns since the request started" on the way out.
Exports: Resource, Trace, TraceLimits, Dropped, RESOURCE_TYPES, STATES, frame_origin.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

from ._failures import report
from ._recording import AnnotationValue, Dropped, Resource, _PyTraceCore, _TraceCore
from ._serialize import stack_table_json, trace_dict, trace_json

_c_start_trace: Callable[..., Any] | None
try:  # the optional C accelerator (see _speedups.c): a trace made in one call
    from ._speedups import start_trace as _c_start_trace
except ImportError:  # pragma: no cover - built everywhere the tests run
    _c_start_trace = None

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


# Trace ids drawn from the OS 256 at a time: one system call for many requests. list.pop()
# is atomic, so threads starting traces at once never share an id.
trace_ids: list[str] = []


def new_trace_id() -> str:
    # 16 random bytes, the size of a W3C trace-id, so traces can be joined with other systems.
    try:
        return trace_ids.pop()
    except IndexError:
        drawn = os.urandom(16 * 256).hex()
        trace_ids.extend(drawn[i : i + 32] for i in range(32, len(drawn), 32))
        return drawn[:32]


def machine_limits(limits: TraceLimits) -> tuple[int, int, int, int, int, int]:
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
            try:  # new_trace_id(), without its frame
                trace_id = trace_ids.pop()
            except IndexError:
                trace_id = new_trace_id()
        self.trace_id = trace_id
        self.request: dict[str, Any] = request if request is not None else {}
        self.origin = origin
        self.started_at_unix_ns = started_at_unix_ns
        self.ended_at: int | None = None
        self.limits = limits = limits or _DEFAULT_LIMITS
        kept = _limit_ints.get(id(limits))  # machine_limits(limits), without its frame
        (
            self._max_resources,
            self._max_annotations,
            self._max_annotation_length,
            self._max_callbacks,
            self._max_stacks,
            self.stack_depth,
        ) = kept[1] if kept is not None and kept[0] is limits else machine_limits(limits)
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
        if _c_start_trace is not None and c_trace_class(cls):
            # What the lines below make, in one C call (see start_trace in _speedups.c)
            if not trace_id:
                try:
                    trace_id = trace_ids.pop()
                except IndexError:
                    trace_id = new_trace_id()
            limits = limits or _DEFAULT_LIMITS
            kept = _limit_ints.get(id(limits))
            ints = kept[1] if kept is not None and kept[0] is limits else machine_limits(limits)
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
        return trace_dict(self)

    def to_json(self) -> bytes:
        """The trace in format v1 as JSON: ``orjson.dumps(self.to_dict())``, byte for byte.

        With the C accelerator the resources and annotations are written straight from the
        model, with no dict, list or int made for them: several times faster, and nothing for
        the garbage collector on a request's way out. A failure there is counted and the
        Python path used.
        """
        return trace_json(self, True)

    def json_without_stacks(self) -> bytes:
        """``to_json()`` but for its ``stackTraces`` entry: for the response header, which
        takes the stack table from a cache of its compressed form (see ``stack_table_json``)."""
        return trace_json(self, False)

    def stack_table_json(self) -> bytes:
        """The ``stackTraces`` array as JSON, as ``to_json()`` writes it."""
        return stack_table_json(self.stacks)

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


def c_trace_class(cls: type[Trace]) -> bool:
    """Whether the accelerator makes traces of ``cls`` in one call (``cls.__init__`` and
    ``cls.add`` are Trace's own, and it is built)."""
    return _c_start_trace is not None and cls.__init__ is _TRACE_INIT and cls.add is _CORE_ADD


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
