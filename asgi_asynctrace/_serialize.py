"""Format v1 out: a trace as JSON (and as a plain dict), written from the model.

    data = trace_json(trace, with_stacks=True)   # what Trace.to_json() returns
    table = stack_table_json(trace.stacks)       # its "stackTraces" array alone

With the C accelerator the resources and annotations are written straight from the records;
a failure there is counted and the Python path used. ``_load`` reads the format back.
Exports: FORMAT_VERSION, resource_dicts, stack_table_json, trace_dict, trace_json.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import orjson

from ._failures import report
from ._recording import Resource, _PyResource

if TYPE_CHECKING:
    from ._model import Trace

_c_stacks_json: Callable[..., bytes] | None
_c_in_order: Callable[[list[Any]], bool | None] | None
_c_trace_json: Callable[..., bytes] | None
try:  # the optional C accelerator (see _speedups.c); the same in Python below
    from ._speedups import in_order as _c_in_order
    from ._speedups import stacks_json as _c_stacks_json
    from ._speedups import trace_json as _c_trace_json
except ImportError:  # pragma: no cover - built everywhere the tests run
    _c_in_order = _c_stacks_json = _c_trace_json = None

__all__ = ["FORMAT_VERSION", "resource_dicts", "stack_table_json", "trace_dict", "trace_json"]

FORMAT_VERSION: Final = 1


def trace_dict(trace: Trace) -> dict[str, Any]:
    """The trace in format v1, as a plain dict."""
    return _as_dict(trace, resource_dicts(_ordered(trace), trace.origin))


def stack_table_json(stacks: list[tuple[str, ...]]) -> bytes:
    """The ``stackTraces`` array as JSON, as ``to_json()`` writes it."""
    accelerated: Exception | None = None
    if _c_stacks_json is not None:
        try:
            if len(_frames_json) > _MAX_FRAMES_JSON:
                _frames_json.clear()
            return _c_stacks_json(stacks, _frames_json, orjson.dumps)
        except Exception as exc:
            accelerated = exc
    table: list[dict[str, Any]] = [{"id": i, "frames": list(f)} for i, f in enumerate(stacks)]
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


def trace_json(trace: Trace, with_stacks: bool) -> bytes:
    """The trace in format v1 as JSON, with its ``stackTraces`` entry or without it (see
    ``Trace.to_json``)."""
    ordered = _ordered(trace)
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
            head = dumps(_head(trace, trace.request))
            data = _c_trace_json(
                head, ordered, trace.origin, _SLOTS, trace.stacks if with_stacks else None,
                _frames_json, trace.annotations, dumps(trace.dropped.to_dict()), dumps,
                strings,
            )  # fmt: skip
            if trace.samples:  # rare (a step that blocked the loop): after "dropped"
                data = b"".join((data[:-1], b',"samples":', _samples_json(trace), b"}"))
            return data
        except Exception as exc:
            accelerated = exc
    no_stacks = None if with_stacks else ()
    out = _as_dict(trace, resource_dicts(ordered, trace.origin), stacks=no_stacks)
    if not with_stacks:
        del out["stackTraces"]
    try:
        data = orjson.dumps(out)
    except orjson.JSONEncodeError as exc:
        # A value JSON cannot hold (a string with lone surrogates, an int beyond 64 bits):
        # written in a form it can, rather than losing the trace.
        report("serialize", exc)
        out = _as_dict(trace, resource_dicts(ordered, trace.origin), stacks=no_stacks, safe=True)
        if not with_stacks:
            del out["stackTraces"]
        return orjson.dumps(out)
    if accelerated is not None:  # the C writer failed where Python did not: its bug
        report("serialize-accelerated", accelerated)
    return data


def _ordered(trace: Trace) -> list[Resource]:
    ordered = trace.resources
    return sorted(ordered, key=_ID) if _out_of_order(trace) else ordered


def _as_dict(
    trace: Trace, resources: Any, annotations: Any = None, stacks: Any = None, safe: bool = False
) -> dict[str, Any]:
    if annotations is None:
        annotations = [{"asyncId": a, "key": k, "value": v} for a, k, v in trace.annotations]
    if stacks is None:
        stacks = [{"id": i, "frames": list(f)} for i, f in enumerate(trace.stacks)]
    out = {
        **_head(trace, dict(trace.request)),
        "resources": resources,
        "stackTraces": stacks,
        "annotations": annotations,
        "dropped": trace.dropped.to_dict(),
    }
    if trace.samples:
        out["samples"] = _sample_dicts(trace)
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


def _sample_dicts(trace: Trace) -> list[dict[str, Any]]:
    """``samples`` in format v1: each with its time from the request's start."""
    o = trace.origin
    return [
        {"asyncId": rid, "at": at - o, "frames": list(frames)}
        for rid, at, frames in trace.samples or ()
    ]


def _samples_json(trace: Trace) -> bytes:
    dicts = _sample_dicts(trace)
    try:
        return orjson.dumps(dicts)
    except orjson.JSONEncodeError:  # a frame JSON cannot hold: as _as_dict(safe=True)
        for sample in dicts:
            sample["frames"] = [_json_safe(f) for f in sample["frames"]]
        return orjson.dumps(dicts)


def _head(trace: Trace, request: dict[str, Any]) -> dict[str, Any]:
    """The fields of format v1 before "resources", in their order."""
    return {
        "version": FORMAT_VERSION,
        "traceId": trace.trace_id,
        "request": request,
        "startedAtUnixNs": trace.started_at_unix_ns,
        "requestDurationNs": trace.duration_ns,
    }


def _out_of_order(trace: Trace) -> bool:
    if _c_in_order is not None:
        known = _c_in_order(trace.resources)
        if known is not None:
            return not known
    ids = list(map(_ID, trace.resources))
    return ids != sorted(ids)


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
