"""Join the traces of one request across services: each downstream root under its fetch.

    whole = join_traces([frontend, backend, database_proxy])   # the traces with no parent here

A service running the middleware traces a call that carries ``X-Async-Trace-Parent`` (see
``propagate_to``) and records it as ``request.parent = {traceId, asyncId}``. Joining renumbers
the downstream trace's resources after the upstream's, turns its root into a ``remote-root``
whose trigger is the upstream ``fetch``, and places its times by wall clock (both traces
carry their start as Unix time). Exports: join_traces.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._model import Resource, Trace

__all__ = ["join_traces"]


def join_traces(traces: Sequence[Trace]) -> list[Trace]:
    """The given traces joined: every trace whose upstream is among them goes into it."""
    by_id = {t.trace_id: t for t in traces}
    children: dict[str, list[Trace]] = {}
    tops: list[Trace] = []
    for trace in traces:
        parent = trace.request.get("parent")
        upstream = parent.get("traceId") if isinstance(parent, dict) else None
        if upstream in by_id and upstream != trace.trace_id:
            children.setdefault(upstream, []).append(trace)
        else:
            tops.append(trace)
    return [_joined(top, children, set()) for top in tops]


def _joined(trace: Trace, children: dict[str, list[Trace]], seen: set[str]) -> Trace:
    seen.add(trace.trace_id)
    out = _copy(trace)
    for child in children.get(trace.trace_id, ()):
        if child.trace_id not in seen:
            _attach(out, _joined(child, children, seen))
    return out


def _copy(trace: Trace) -> Trace:
    out = Trace(trace_id=trace.trace_id, request=dict(trace.request), origin=trace.origin,
                started_at_unix_ns=trace.started_at_unix_ns, limits=trace.limits)  # fmt: skip
    out.ended_at = trace.ended_at
    out.closed = True
    out.stacks = list(trace.stacks)
    out.annotations = list(trace.annotations)
    out.dropped = trace.dropped
    out.samples = list(trace.samples) if trace.samples else None
    for r in trace.resources:
        out.resources.append(_clone(r, 0, 0, r.trigger_id, {}))
    return out


def _clone(
    r: Resource, id_offset: int, shift: int, trigger: int, stacks: dict[int, int]
) -> Resource:
    c = Resource(r.async_id + id_offset, trigger, r.type, None, r.created_at + shift)
    c.stack_id = stacks.get(r.stack_id, r.stack_id) if r.stack_id is not None else None
    c.callbacks = [t + shift for t in r.callbacks]
    c.settled_at = r.settled_at + shift if r.settled_at is not None else None
    c.state = r.state
    c.annotation_count = r.annotation_count
    c.awaited_by = [a + id_offset for a in r.awaited_by] if r.awaited_by else None
    return c


def _attach(up: Trace, down: Trace) -> None:
    parent = down.request.get("parent") or {}
    named = parent.get("asyncId")
    # the fetch may have been dropped by a cap: then the root is the best we know
    fetch_id = 1
    if isinstance(named, int) and any(r.async_id == named for r in up.resources):
        fetch_id = named
    offset = max(r.async_id for r in up.resources)
    # both clocks are read as "ns since the trace's own start"; Unix start times align them
    shift = (up.origin - down.origin) + (down.started_at_unix_ns - up.started_at_unix_ns)
    stacks = {}
    for i, frames in enumerate(down.stacks):
        stacks[i] = len(up.stacks)
        up.stacks.append(frames)
    fetch = next(r for r in up.resources if r.async_id == fetch_id)
    for r in down.resources:
        is_root = r.trigger_id == 0
        trigger = fetch_id if is_root else r.trigger_id + offset
        c = _clone(r, offset, shift, trigger, stacks)
        if is_root:
            c.type = "remote-root"
            # The service finishes its bookkeeping after the last byte leaves; as the caller
            # saw it, the remote request was over when its fetch was.
            end = fetch.settled_at
            if end is not None and c.settled_at is not None and c.settled_at > end:
                up.annotations.append((c.async_id, "endedAfterFetchNs", c.settled_at - end))
                c.settled_at = max(end, c.created_at)
        up.resources.append(c)
    for rid, key, value in down.annotations:
        up.annotations.append((rid + offset, key, value))
    if down.samples:
        samples = up.samples if up.samples is not None else []
        samples.extend((rid + offset, at + shift, frames) for rid, at, frames in down.samples)
        up.samples = samples
    up.annotations.append((down.root.async_id + offset, "remoteTraceId", down.trace_id))
