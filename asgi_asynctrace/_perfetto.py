"""Traces as real Perfetto protobuf traces (open them at ui.perfetto.dev).

    data = to_perfetto(trace)                         # bytes of a .pftrace
    sink = PerfettoSink("requests.pftrace")           # or AsyncTraceMiddleware(perfetto_path=...)

Each request is a track group named after it; each resource is a track under it, holding one
slice for its life (created to settled, with its type, annotations and creation stack as debug
annotations) and inside that one slice per callback interval (each step a task ran, a thread
job's run), with a mark where the watchdog saw a step that blocked the loop. A flow arrow joins
the moment a resource was created, on its trigger's track, to the new resource's slice.
Timestamps are wall-clock nanoseconds, so several requests written to one file line up in
time. Needs the ``perfetto`` package (``pip install 'asgi-asynctrace[perfetto]'``).
Exports: to_perfetto, trace_packets, PerfettoSink.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

from ._analysis import creation_stack, label
from ._model import Resource, Trace

__all__ = ["PerfettoSink", "to_perfetto", "trace_packets"]

_SEQUENCE = 0x5A51  # trusted_packet_sequence_id of every packet we write
_ID_BITS = 20  # resources per trace that get a track: 2**20, far above the default cap


def _protos() -> Any:
    try:
        from perfetto.protos.perfetto.trace import perfetto_trace_pb2
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "Perfetto export needs the perfetto package: pip install 'asgi-asynctrace[perfetto]'"
        ) from exc
    return perfetto_trace_pb2


def _annotate(event: Any, name: str, value: object) -> None:
    item = event.debug_annotations.add()
    item.name = name
    if isinstance(value, bool):
        item.bool_value = value
    elif isinstance(value, int) and -(2**63) <= value < 2**63:
        item.int_value = value
    elif isinstance(value, float):
        item.double_value = value
    else:
        item.string_value = "null" if value is None else str(value)


def trace_packets(trace: Trace) -> Iterator[Any]:
    """The TracePackets of one trace: track descriptors first, then events in time order."""
    pb = _protos()
    base = (int(trace.trace_id[:11], 16) if trace.trace_id[:11].isalnum() else 0) << _ID_BITS
    base = base or (abs(hash(trace.trace_id)) % (1 << 43)) << _ID_BITS
    wall = trace.started_at_unix_ns - trace.origin  # raw clock -> wall-clock ns
    end = trace.origin + trace.duration_ns
    notes: dict[int, dict[str, Any]] = {}
    for rid, key, value in trace.annotations:
        notes.setdefault(rid, {})[key] = value
    group = base  # async ids start at 1, so the group's uuid is free
    req = trace.request
    title = " ".join(str(x) for x in (req.get("method"), req.get("path"), req.get("status")) if x)

    packet = pb.TracePacket()
    packet.trusted_packet_sequence_id = _SEQUENCE
    packet.track_descriptor.uuid = group
    packet.track_descriptor.name = f"{title or 'request'} · trace {trace.trace_id[:8]}"
    packet.track_descriptor.child_ordering = pb.TrackDescriptor.ChildTracksOrdering.EXPLICIT
    yield packet

    tracked = [r for r in trace.resources if r.async_id < (1 << _ID_BITS)]
    for rank, r in enumerate(tracked):
        packet = pb.TracePacket()
        packet.trusted_packet_sequence_id = _SEQUENCE
        d = packet.track_descriptor
        d.uuid = base | r.async_id
        d.parent_uuid = group
        d.name = f"{r.type} {label(r, notes.get(r.async_id, {}), creation_stack(trace, r))} "
        d.name += f"#{r.async_id}"
        d.sibling_order_rank = rank
        yield packet

    # Each resource's own events are well nested by construction (begin, steps, end, clamped
    # into its life); they are merged by time, keeping each resource's own order at ties.
    events: list[tuple[int, int, float, tuple[Any, ...]]] = []
    ids = {r.async_id for r in tracked}
    for r in tracked:
        start = r.created_at
        stop = max(r.settled_at if r.settled_at is not None else end, start)
        track = base | r.async_id
        flow = (base | r.async_id) if r.trigger_id in ids else None
        rid = r.async_id
        events.append((start, rid, 0, ("begin", r, track, flow, notes.get(rid))))
        cb = r.callbacks
        last = start
        for n, i in enumerate(range(0, len(cb), 2)):
            b = min(max(cb[i], last), stop)
            e = min(max(cb[i + 1] if i + 1 < len(cb) else stop, b), stop)
            events.append((b, rid, 1 + 2 * n, ("step-begin", r, track, None, None)))
            events.append((e, rid, 2 + 2 * n, ("step-end", r, track, None, None)))
            last = e
        events.append((stop, rid, float("inf"), ("end", r, track, None, None)))
        if flow is not None:  # on the trigger's track, just inside whatever runs there then
            creation = ("flow", r, base | r.trigger_id, flow, None)
            events.append((start, r.trigger_id, 0.5, creation))
    # Where the watchdog saw a long step: a mark inside that step's slice, with the stack.
    for rid, at, frames in trace.samples or ():
        if rid in ids:
            events.append((at, rid, 0.75, ("sample", None, base | rid, None, frames)))
    events.sort(key=lambda ev: (ev[0], ev[1], ev[2]))
    TYPE = pb.TrackEvent.Type
    for at, _, _, (kind, r, track, flow, info) in events:
        packet = pb.TracePacket()
        packet.trusted_packet_sequence_id = _SEQUENCE
        packet.timestamp = wall + at
        ev = packet.track_event
        ev.track_uuid = track
        if kind == "begin":
            ev.type = TYPE.TYPE_SLICE_BEGIN
            ev.name = f"{r.type} {label(r, info or {}, creation_stack(trace, r))}"
            ev.categories.append(r.type)
            _describe(ev, trace, r, info or {})
            if flow is not None:
                ev.terminating_flow_ids.append(flow)
        elif kind == "end":
            ev.type = TYPE.TYPE_SLICE_END
        elif kind == "step-begin":
            ev.type = TYPE.TYPE_SLICE_BEGIN
            ev.name = "run" if r.type in ("thread", "timer") else "step"
            ev.categories.append("callback")
        elif kind == "step-end":
            ev.type = TYPE.TYPE_SLICE_END
        elif kind == "sample":
            ev.type = TYPE.TYPE_INSTANT
            ev.name = f"blocked at {info[0]}" if info else "blocked"
            ev.categories.append("blocked")
            _annotate(ev, "stack", "\n".join(info))
        else:  # the creation, on the trigger's track: where the arrow starts
            ev.type = TYPE.TYPE_INSTANT
            ev.name = f"creates {r.type} #{r.async_id}"
            ev.flow_ids.append(flow)
        yield packet


def _describe(ev: Any, trace: Trace, r: Resource, info: dict[str, Any]) -> None:
    _annotate(ev, "asyncId", r.async_id)
    _annotate(ev, "triggerId", r.trigger_id)
    _annotate(ev, "state", r.state)
    for key, value in info.items():
        _annotate(ev, key, value)
    if r.stack_id is not None and r.stack_id < len(trace.stacks):
        _annotate(ev, "stack", "\n".join(trace.stacks[r.stack_id]))


def to_perfetto(*traces: Trace) -> bytes:
    """One .pftrace holding the given traces."""
    from perfetto.trace_builder.proto_builder import TraceProtoBuilder

    builder = TraceProtoBuilder()
    for trace in traces:
        for packet in trace_packets(trace):
            builder.trace.packet.append(packet)
    data: bytes = builder.serialize()
    return data


class PerfettoSink:
    """A sink that streams every trace into one .pftrace file, packet by packet.

    The file is appended to and flushed after each trace, so it is a valid trace at any moment
    the process stops; nothing but the trace being written is held in memory.
    """

    needs_json = False  # reads the Trace itself

    def __init__(self, path: str | os.PathLike[str]) -> None:
        _protos()  # fail at startup, not on the first request, when perfetto is missing
        self.path = os.fspath(path)
        self._lock = threading.Lock()

    def __call__(self, trace: Trace, data: bytes | None) -> None:
        from perfetto.trace_builder.proto_builder import StreamingTraceProtoBuilder

        with self._lock, open(self.path, "ab") as file:
            builder = StreamingTraceProtoBuilder(file)
            for packet in trace_packets(trace):
                builder.write_packet(packet)
