"""Traces in clinic bubbleprof's data format, for ``clinic bubbleprof --visualize-only``.

    write_bubbleprof([trace], "out")    # out/asynctrace.clinic-bubbleprof/ with three files
    # then: clinic bubbleprof --visualize-only out/asynctrace.clinic-bubbleprof

Bubbleprof reads a directory holding ``<name>.clinic-bubbleprof-systeminfo`` (JSON),
``-stacktrace`` (length-prefixed protobuf ``StackTrace`` records, every ``Frame`` field
present) and ``-traceevent`` (Chrome trace events: ``b``/``e`` for a resource's init and destroy,
``<TYPE>_CALLBACK`` ``b``/``e`` around each callback, ``args.data.triggerAsyncId``; the root is
async id 1). Frames are mapped so bubbleprof's own user / dependency / core split comes out
right: the app's files sit under the main directory, ``site-packages/<pkg>`` becomes
``node_modules/<pkg>``, the standard library ``node:<module>``. Types are mapped to the Node
names bubbleprof colours (tasks and futures as promises, timers as timeouts, I/O as network,
bodies as streams); thread-pool jobs keep their own name. Exports: write_bubbleprof,
bubbleprof_files.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from typing import Any

import orjson

from ._model import Resource, Trace

__all__ = ["bubbleprof_files", "write_bubbleprof"]

MAIN_DIRECTORY = "/app"
_NODE_TYPES = {
    "task": "PROMISE",
    "future": "PROMISE",
    "timer": "Timeout",
    "stream-read": "JSSTREAM",
    "stream-write": "WRITEWRAP",
    "thread": "THREADPOOLJOB",
}
_NETWORK = "TCPWRAP"  # fetch, kv, db, cache, queues, websockets: sockets underneath
_PROVIDERS = ["TickObject", "Timeout", "Immediate", "PROMISE", "TCPWRAP", "JSSTREAM", "WRITEWRAP"]


def _node_type(rtype: str) -> str:
    if rtype in _NODE_TYPES:
        return _NODE_TYPES[rtype]
    return _NETWORK if rtype != "other" else "ASYNCTRACE_OTHER"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _string(field: int, text: str) -> bytes:
    data = text.encode()
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _number(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _frame(frame: str) -> bytes:
    """One ``StackTrace.Frame`` with all ten fields, from ``function @ path:line:column``."""
    name, _, where = frame.rpartition(" @ ")
    path, line, column = where, 0, 0
    parts = where.rsplit(":", 2)
    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        path, line, column = parts[0], int(parts[1]), int(parts[2])
    if path.startswith("site-packages/"):
        file_name = f"{MAIN_DIRECTORY}/node_modules/{path[len('site-packages/') :]}"
    elif path.startswith("<stdlib>/"):
        file_name = "node:" + path[len("<stdlib>/") :].removesuffix(".py").replace("/", ".")
    elif path.startswith("/"):
        file_name = path
    else:
        file_name = f"{MAIN_DIRECTORY}/{path}"
    type_name, _, function = name.rpartition(".")
    return b"".join((
        _string(1, function.replace("<locals>", "").strip(".") or name),
        _string(2, type_name.replace(".<locals>", "")),
        _number(3, 0), _number(4, 0), _number(5, 0), _number(6, 0),
        _string(7, ""), _string(8, file_name), _number(9, line), _number(10, column),
    ))  # fmt: skip


def _stack_record(async_id: int, frames: Sequence[str]) -> bytes:
    body = b"\x09" + struct.pack("<d", float(async_id))
    for frame in frames:
        encoded = _frame(frame)
        body += b"\x12" + _varint(len(encoded)) + encoded
    return struct.pack(">I", len(body)) + body


def bubbleprof_files(traces: Sequence[Trace]) -> dict[str, bytes]:
    """The three files' contents (by suffix: systeminfo, stacktrace, traceevent).

    Several traces go into one timeline: each keeps its own ids, offset so they never clash,
    and hangs off bubbleprof's root (async id 1) as its own request.
    """
    events: list[dict[str, Any]] = []
    stacks: list[bytes] = []
    offset = 1
    for trace in traces:
        top = offset + max((r.async_id for r in trace.resources), default=0)
        _export(trace, offset, events, stacks)
        offset = top + 1
    info = {"providers": [*_PROVIDERS, "THREADPOOLJOB", "ASYNCTRACE_OTHER"],
            "pathSeparator": "/", "mainDirectory": MAIN_DIRECTORY}  # fmt: skip
    events.sort(key=lambda e: e["ts"])
    return {
        "systeminfo": orjson.dumps(info),
        "stacktrace": b"".join(stacks),
        "traceevent": orjson.dumps({"traceEvents": events}),
    }


def _export(trace: Trace, offset: int, events: list[dict[str, Any]], stacks: list[bytes]) -> None:
    o = trace.origin
    base_us = trace.started_at_unix_ns / 1000

    def ts(t: int) -> float:
        return base_us + (t - o) / 1000

    root = trace.root
    # Our root becomes a request resource under bubbleprof's root (1), so traces stay apart.
    ids = {r.async_id: r.async_id + offset for r in trace.resources}
    for r in trace.resources:
        rid = ids[r.async_id]
        name = "HTTPINCOMINGMESSAGE" if r is root else _node_type(r.type)
        trigger = 1 if r is root else ids.get(r.trigger_id, 1)
        data = {"triggerAsyncId": trigger, "executionAsyncId": trigger}
        events.append(_event("b", name, rid, ts(r.created_at), data))
        frames = trace.stacks[r.stack_id] if r.stack_id is not None else ()
        stacks.append(_stack_record(rid, frames or (f"{r.type} @ {r.type}:0:0",)))
        cb = r.callbacks
        for i in range(0, len(cb), 2):
            start = cb[i]
            end = cb[i + 1] if i + 1 < len(cb) else o + trace.duration_ns
            run = {"executionAsyncId": rid, "triggerAsyncId": trigger}
            events.append(_event("b", name + "_CALLBACK", rid, ts(start), run))
            events.append(_event("e", name + "_CALLBACK", rid, ts(max(end, start)), run))
        settled = _settled(r, o + trace.duration_ns)
        events.append(_event("e", name, rid, ts(max(settled, r.created_at)), {}))


def _settled(r: Resource, end: int) -> int:
    if r.settled_at is not None:
        return r.settled_at
    return r.callbacks[-1] if len(r.callbacks) % 2 == 0 and r.callbacks else end


def _event(ph: str, name: str, rid: int, ts: float, data: dict[str, Any]) -> dict[str, Any]:
    return {"pid": 1, "tid": 1, "ts": ts, "ph": ph, "cat": "node,node.async_hooks",
            "name": name, "id": hex(rid), "args": {"data": data} if data else {}}  # fmt: skip


def write_bubbleprof(
    traces: Sequence[Trace], directory: str | os.PathLike[str], name: str = "asynctrace"
) -> str:
    """Write ``<directory>/<name>.clinic-bubbleprof/`` and return its path."""
    target = os.path.join(os.fspath(directory), f"{name}.clinic-bubbleprof")
    os.makedirs(target, exist_ok=True)
    for suffix, data in bubbleprof_files(traces).items():
        with open(os.path.join(target, f"{name}.clinic-bubbleprof-{suffix}"), "wb") as file:
            file.write(data)
    return target
