"""Reading traces back: format v1, and the seed runtime's JSON (its ``sample-*.json`` shape).

    trace = load_trace(open("trace.json", "rb").read())
    trace.root.state, len(trace.resources), trace.to_dict()["version"]

Every problem is a ``TraceFormatError`` that says where in the document it is.
Exports: TraceFormatError, load_trace.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import orjson

from ._model import STATES, Resource, Trace, TraceLimits

__all__ = ["TraceFormatError", "load_trace"]

# Loading never drops: a file is shown as it was written, whatever caps it was made with.
_UNCAPPED = TraceLimits(
    max_resources=2**62,
    max_callbacks_per_resource=2**62,
    max_annotations_per_resource=2**62,
    max_annotation_length=2**62,
    max_stacks=2**62,
)


class TraceFormatError(ValueError):
    """The input is not a trace this version can read."""


def load_trace(data: bytes | str | dict[str, Any]) -> Trace:
    """A Trace from JSON text or an already parsed document (format v1 or the seed's)."""
    if isinstance(data, dict):
        doc = data
    else:
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise TraceFormatError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise TraceFormatError(f"a trace is a JSON object, got {type(doc).__name__}")
    version = doc.get("version")
    if version is None:
        return _load_seed(doc)
    if version != 1:
        raise TraceFormatError(f"unsupported trace format version {version!r} (this reads 1)")
    return _load_v1(doc)


def _field(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise TraceFormatError(f"{where}: missing {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise TraceFormatError(f"{where}.{key}: expected {_kind_name(kind)}, got {value!r:.60}")
    return value


def _optional_int(obj: dict[str, Any], key: str, where: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise TraceFormatError(f"{where}.{key}: expected an integer or null, got {value!r:.60}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _list(doc: dict[str, Any], key: str) -> list[Any]:
    value = doc.get(key, [])
    if not isinstance(value, list):
        raise TraceFormatError(f"{key}: expected a list, got {type(value).__name__}")
    return value


def _objects(doc: dict[str, Any], key: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each entry of the list ``doc[key]`` with where it is, checking that it is an object."""
    for i, entry in enumerate(_list(doc, key)):
        where = f"{key}[{i}]"
        if not isinstance(entry, dict):
            raise TraceFormatError(f"{where}: expected an object")
        yield where, entry


def _new(doc: dict[str, Any], duration: int) -> Trace:
    request = doc.get("request") or {}
    if not isinstance(request, dict):
        raise TraceFormatError("request: expected an object")
    trace_id = doc.get("traceId")
    trace = Trace(
        trace_id=trace_id if isinstance(trace_id, str) and trace_id else None,
        request=request,
        origin=0,
        started_at_unix_ns=doc.get("startedAtUnixNs") or 0,
        limits=_UNCAPPED,
    )
    trace.ended_at = duration
    trace.closed = True
    return trace


def _stacks(trace: Trace, doc: dict[str, Any]) -> dict[int, int]:
    """Read the stack table; returns file id -> our id (ids are renumbered densely from 0)."""
    mapping: dict[int, int] = {}
    for where, entry in _objects(doc, "stackTraces"):
        sid = _field(entry, "id", int, where)
        frames = _field(entry, "frames", list, where)
        if not all(isinstance(f, str) for f in frames):
            raise TraceFormatError(f"{where}.frames: expected a list of strings")
        mapping[sid] = len(trace.stacks)
        trace.stacks.append(tuple(frames))
    return mapping


def _annotations(trace: Trace, doc: dict[str, Any], by_id: dict[int, Resource]) -> None:
    for where, entry in _objects(doc, "annotations"):
        rid = _field(entry, "asyncId", int, where)
        key = _field(entry, "key", str, where)
        value = entry.get("value")
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise TraceFormatError(f"{where}.value: expected a string, number, bool or null")
        res = by_id.get(rid)
        if res is not None:
            res.annotation_count += 1
        trace.annotations.append((rid, key, value))


def _load_v1(doc: dict[str, Any]) -> Trace:
    duration = _field(doc, "requestDurationNs", int, "trace")
    trace = _new(doc, duration)
    stacks = _stacks(trace, doc)
    by_id: dict[int, Resource] = {}
    for where, entry in _objects(doc, "resources"):
        res = _resource(entry, where, stacks)
        callbacks = _field(entry, "callbacks", list, where)
        for j, pair in enumerate(callbacks):
            if (
                not isinstance(pair, list)
                or len(pair) != 2
                or not isinstance(pair[0], int)
                or not (pair[1] is None or isinstance(pair[1], int))
            ):
                raise TraceFormatError(f"{where}.callbacks[{j}]: expected [start, end|null]")
            res.callbacks.append(pair[0])
            if pair[1] is not None:
                res.callbacks.append(pair[1])
        state = _field(entry, "state", str, where)
        if state not in STATES:
            raise TraceFormatError(f"{where}.state: {state!r} is not one of {', '.join(STATES)}")
        res.state = state
        res.settled_at = _optional_int(entry, "destroyedAt", where)
        awaited = entry.get("awaitedBy")
        if isinstance(awaited, list) and all(isinstance(a, int) for a in awaited):
            res.awaited_by = list(awaited)
        trace.resources.append(res)
        by_id[res.async_id] = res
    _annotations(trace, doc, by_id)
    _samples(trace, doc)
    dropped = doc.get("dropped")
    if isinstance(dropped, dict):
        d = trace.dropped
        d.resources = int(dropped.get("resources") or 0)
        d.annotations = int(dropped.get("annotations") or 0)
        d.callbacks = int(dropped.get("callbacks") or 0)
        d.stacks = int(dropped.get("stacks") or 0)
        d.truncated = int(dropped.get("truncatedValues") or 0)
    return trace


def _samples(trace: Trace, doc: dict[str, Any]) -> None:
    """The watchdog's stacks of steps that blocked the loop (optional; absent: none taken)."""
    samples = []
    for where, entry in _objects(doc, "samples"):
        rid = _field(entry, "asyncId", int, where)
        at = _field(entry, "at", int, where)
        frames = _field(entry, "frames", list, where)
        if not all(isinstance(f, str) for f in frames):
            raise TraceFormatError(f"{where}.frames: expected a list of strings")
        samples.append((rid, at, tuple(frames)))
    trace.samples = samples or None


def _resource(entry: dict[str, Any], where: str, stacks: dict[int, int]) -> Resource:
    rid = _field(entry, "asyncId", int, where)
    trigger = _field(entry, "triggerId", int, where)
    rtype = _field(entry, "type", str, where)
    created = _field(entry, "createdAt", int, where)
    sid = _optional_int(entry, "stackTraceId", where)
    if sid is not None and sid not in stacks:
        raise TraceFormatError(f"{where}.stackTraceId: {sid} is not in stackTraces")
    return Resource(rid, trigger, rtype, stacks[sid] if sid is not None else None, created)


_CAMEL = re.compile(r"(?<=[a-z0-9])([A-Z])")


def seed_type(name: str) -> str:
    """The seed's resource type names ("kCacheGet", "cacheGet", "CACHE_GET") in our kebab-case."""
    if len(name) > 1 and name[0] == "k" and name[1].isupper():
        name = name[1:]
    return _CAMEL.sub(r"-\1", name).replace("_", "-").lower()


def _load_seed(doc: dict[str, Any]) -> Trace:
    """The seed wrote 0 for "never" and for "no stack"; we read 0 that way where it must be."""
    if "resources" not in doc:
        raise TraceFormatError("not a trace: no 'version' and no 'resources'")
    duration = _optional_int(doc, "requestDurationNs", "trace")
    if duration is None:
        raise TraceFormatError("trace: missing 'requestDurationNs'")
    trace = _new(doc, duration)
    stacks = _stacks(trace, doc)
    by_id: dict[int, Resource] = {}
    for where, entry in _objects(doc, "resources"):
        raw_type = entry.get("type")
        if isinstance(raw_type, str):
            entry = {**entry, "type": seed_type(raw_type)}
        sid = _optional_int(entry, "stackTraceId", where)
        if sid is not None and sid not in stacks:
            entry = {**entry, "stackTraceId": None}
        res = _resource(entry, where, stacks)
        is_root = res.type == "root"
        started = _optional_int(entry, "callbackStartedAt", where)
        ended = _optional_int(entry, "callbackEndedAt", where)
        destroyed = _optional_int(entry, "destroyedAt", where)
        if started is not None and (started or ended or is_root):
            res.callbacks.append(started)
            if ended is not None and ended >= started:
                res.callbacks.append(ended)
        if is_root:
            res.settled_at = destroyed or duration
        elif destroyed:
            res.settled_at = destroyed
        res.state = "ok" if res.settled_at is not None else "pending"
        trace.resources.append(res)
        by_id[res.async_id] = res
    _annotations(trace, doc, by_id)
    return trace
