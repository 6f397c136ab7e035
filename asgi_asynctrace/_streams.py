"""Request and response bodies, and websocket messages, as the middleware sees them pass.

    body = BodyStream(trace, "stream-read")
    body.chunk(parent, started, ended, size, last=False)   # one per http.request message
    body.close()                                           # when the request ends

A body is one resource however many chunks it has: each chunk is one callback interval, from
the moment the app asked for it (``receive()``) or handed it over (``send()``) to the moment it
came back, so the time spent blocked on a slow client shows as the intervals' length. A
websocket message is a resource of its own. Exports: BodyStream, body_chunk, whole_body,
message_size, record_message.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from ._model import Resource, Trace

__all__ = ["BodyStream", "body_chunk", "message_size", "record_message", "whole_body"]

_now = time.perf_counter_ns


class BodyStream:
    """One request or response body: created at its first chunk, settled at its last."""

    __slots__ = ("chunks", "res", "size", "trace", "type")

    def __init__(self, trace: Trace, type: str) -> None:
        self.trace = trace
        self.type = type
        self.res: Resource | None = None
        self.size = 0
        self.chunks = 0

    def chunk(self, parent: Resource, started: int, ended: int, size: int, last: bool) -> None:
        trace = self.trace
        if trace.closed:
            return
        res = self.res
        if res is None:
            res = self.res = trace.add(self.type, parent.async_id, None, started)
            if res is None:
                return
        elif res.settled_at is not None:
            return  # chunks after the last one (a second http.response.body): not ours
        trace.begin(res, started)
        trace.end(res, ended)
        self.size += size
        self.chunks += 1
        if last:
            trace.settle(res, ended, "ok")
            self._totals()

    def close(self, state: str = "pending") -> None:
        """The request ended: a body not finished by then keeps ``state``, with its totals."""
        res = self.res
        if res is not None and res.settled_at is None:
            if state != "pending":
                self.trace.settle(res, _now(), state)
            self._totals()

    def _totals(self) -> None:
        res = self.res
        if res is not None:
            self.trace.annotate(res, "bytes", self.size)
            self.trace.annotate(res, "chunks", self.chunks)


def body_chunk(
    stream: BodyStream | None, trace: Trace, type: str, parent: Resource, started: int,
    ended: int, size: int, last: bool,
) -> BodyStream | None:  # fmt: skip
    """One chunk of a body, on its stream; returns the stream to keep for the next chunk. A
    body that comes (or goes) whole in one message, the usual case, is recorded as
    ``BodyStream`` would record it, with no stream object made."""
    if stream is None:
        if not last:
            stream = BodyStream(trace, type)
        else:
            whole_body(trace, type, parent, started, ended, size)
            return None
    stream.chunk(parent, started, ended, size, last)
    return stream


def whole_body(
    trace: Trace, type: str, parent: Resource, started: int, ended: int, size: int | None
) -> Resource | None:
    """A body that came (or went) whole, in one message: its resource, settled, with its size
    (none when it is not known). None once the trace is closed or full."""
    if trace.closed:
        return None
    res = trace.add(type, parent.async_id, None, started)
    if res is not None:
        trace.begin(res, started)
        trace.end(res, ended)
        trace.settle(res, ended, "ok")
        if size is not None:
            trace.annotate(res, "bytes", size)
        trace.annotate(res, "chunks", 1)
    return res


def message_size(message: Mapping[str, Any]) -> tuple[str, int]:
    """A websocket message's kind ("text" or "bytes") and its size in bytes."""
    text = message.get("text")
    if text is not None:
        return "text", len(text.encode())
    return "bytes", len(message.get("bytes") or b"")


def record_message(
    trace: Trace, parent: Resource, direction: str, started: int, ended: int,
    kind: str, size: int | None,
) -> Resource | None:  # fmt: skip
    """One websocket message (or close) as a ``websocket`` resource, alive while it waited."""
    if trace.closed:
        return None
    res = trace.add("websocket", parent.async_id, None, started)
    if res is None:
        return None
    trace.annotate(res, "direction", direction)
    trace.annotate(res, "message", kind)
    if size is not None:
        trace.annotate(res, "bytes", size)
    trace.settle(res, ended, "ok")
    return res
