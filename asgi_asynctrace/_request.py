"""One traced request: its trace, and what the ASGI messages going by tell about it.

    run = TracedRequest(middleware, scope, True, receive, send)
    await app(scope, run.traced_receive, run.traced_send)
    run.finish("ok")

Records the root's annotations (method, path, the route's template, client, status, when the
response started, a disconnect), the upstream a calling service named, request and response
bodies, websocket messages, and puts the trace in the response headers of a request that asked.
Exports: TracedRequest, route_of, Scope, Message, Receive, Send.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from ._context import ACTIVE
from ._failures import report
from ._model import Dropped, Resource, Trace, c_trace_class, machine_limits, new_trace_id, trace_ids
from ._sinks import HEADER_BLOCK, header_room, trace_header
from ._streams import BodyStream, body_chunk, message_size, record_message, whole_body

_find_header: Callable[[Any, bytes], Any] | None
_open_request: Callable[..., Any] | None
try:
    from ._speedups import find_header as _find_header
    from ._speedups import open_request as _open_request
except ImportError:  # built without a compiler: _header_in_python, _open_in_python
    _find_header = _open_request = None

if TYPE_CHECKING:
    from ._middleware import AsyncTraceMiddleware

__all__ = ["Message", "Receive", "Scope", "Send", "TracedRequest"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_now = time.perf_counter_ns
_PARENT = re.compile(rb"([0-9a-f]{32}):([0-9]{1,9})")
_TRACEPARENT = re.compile(rb"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def _header_in_python(scope: Scope, wanted: bytes) -> bytes | None:
    for name, value in scope.get("headers") or ():
        if name == wanted:
            return value  # type: ignore[no-any-return]
    return None


def _header(scope: Scope, wanted: bytes) -> bytes | None:
    """The first header called ``wanted`` (lower case), None when there is none."""
    if _find_header is not None:
        found = _find_header(scope.get("headers") or (), wanted)
        if found is not NotImplemented:  # an unusual shape of headers: scanned in Python
            return found  # type: ignore[no-any-return]
    return _header_in_python(scope, wanted)


def _upstream(scope: Scope) -> tuple[str, int] | None:
    """The calling service's trace and fetch, from ``X-Async-Trace-Parent: <trace>:<id>``."""
    value = _header(scope, b"x-async-trace-parent")
    match = _PARENT.fullmatch(value) if value is not None else None
    return (match[1].decode(), int(match[2])) if match else None


# What starts a response: its status and headers, or a websocket's accept (or its refusal,
# answered with HTTP: the ASGI websocket.http.response extension).
_STARTS = frozenset(("http.response.start", "websocket.accept", "websocket.http.response.start"))


def _current(trace: Trace, root: Resource) -> Resource:
    """The resource that is reading or writing: whoever called receive() or send()."""
    active = ACTIVE.get()
    return active[1] if active is not None and active[0] is trace else root


def route_of(scope: Scope) -> str | None:
    """The path as its route's template, where the router matched parameters in it:
    ``/orders/{order_id}/lines`` for ``/orders/42/lines`` (Starlette and FastAPI leave
    ``path_params`` in the scope, a mount's included, in the order they appear in the path).
    None when there were none: the path is the route. Each value is put back from the last
    parameter to the first, at the last place before the next one's where it makes whole
    path segments: ``/items/items`` is ``/items/{name}``, ``/u/1/v/1`` is ``/u/{a}/v/{b}``."""
    params = scope.get("path_params")
    path = scope.get("path")
    if not params or not isinstance(params, dict) or not isinstance(path, str):
        return None
    route, limit = path, len(path)
    for name, value in reversed(params.items()):
        text = str(value)
        at = route.rfind(text, 0, limit) if text else -1
        while at > 0:
            end = at + len(text)
            if route[at - 1] == "/" and (end == len(route) or route[end] == "/"):
                route = f"{route[:at]}{{{name}}}{route[end:]}"
                limit = at
                break
            at = route.rfind(text, 0, end - 1)
    return route if route != path else None


def trace_settings(owner: AsyncTraceMiddleware) -> tuple[Any, ...] | None:
    """What ``open_request`` makes each of ``owner``'s traces with (None: the Python does)."""
    if _open_request is None or not c_trace_class(Trace):
        return None
    return (Trace, owner.limits, machine_limits(owner.limits), Dropped, owner.record_futures,
            owner.propagate_to, trace_ids, new_trace_id)  # fmt: skip


def _open_in_python(
    owner: AsyncTraceMiddleware, scope: Scope, websocket: bool, traced: str
) -> Trace:
    """What ``open_request`` does, in Python: the trace, its root annotated."""
    method = scope.get("method") or ("WS" if websocket else None)
    path = scope.get("path")
    trace = Trace.start(request={"method": method, "path": path}, limits=owner.limits)
    trace.record_futures = owner.record_futures
    trace.propagate_to = owner.propagate_to
    root = trace.resources[0]
    trace.annotate(root, "method", method)
    trace.annotate(root, "path", path)
    client = scope.get("client")
    if client:
        trace.annotate(root, "client", str(client[0]))
    trace.annotate(root, "traced", traced)
    traceparent = _header(scope, b"traceparent")
    if traceparent is not None and _TRACEPARENT.fullmatch(traceparent):
        trace.request["traceparent"] = traceparent.decode()  # for OpenTelemetry export
    return trace


class TracedRequest:
    """The state of one traced request: its trace and what the ASGI messages told us."""

    __slots__ = (
        "_receive",
        "_send",
        "body_in",
        "body_out",
        "disconnected",
        "owner",
        "requested",
        "response_done",
        "root",
        "routed",
        "scope",
        "trace",
        "websocket",
    )

    def __init__(
        self, owner: AsyncTraceMiddleware, scope: Scope, requested: bool, receive: Receive,
        send: Send,
    ) -> None:  # fmt: skip
        self._receive = receive
        self._send = send
        self.scope = scope
        self.routed = False  # the route's template annotated (for the header, at the start)
        self.owner = owner
        self.requested = requested
        self.disconnected = False
        self.response_done = False
        self.websocket = websocket = scope.get("type") == "websocket"
        traced = "requested" if requested else "sampled"
        settings = owner._trace_settings
        trace: Any = NotImplemented
        if settings is not None and _open_request is not None:  # one C call (_c/request.c)
            trace = _open_request(scope, websocket, traced, settings)
        if trace is NotImplemented:
            trace = _open_in_python(owner, scope, websocket, traced)
        root = trace.resources[0]  # trace.root, without the property's frame
        parent = _upstream(scope) if requested else None
        if parent is not None:
            trace.request["parent"] = {"traceId": parent[0], "asyncId": parent[1]}
            trace.annotate(root, "upstreamTraceId", parent[0])
            trace.annotate(root, "upstreamAsyncId", parent[1])
        self.trace = trace
        self.root = root
        # made at a body's first chunk: most requests have no body to read
        self.body_in: BodyStream | None = None
        self.body_out: BodyStream | None = None

    def client_gone(self, exc: BaseException) -> bool:
        return self.disconnected or type(exc).__name__ == "ClientDisconnected"

    def _route(self) -> None:
        """The route's template, once the router has matched (it has by the response)."""
        self.routed = True
        try:
            route = route_of(self.scope)
            if route is not None:
                self.trace.annotate(self.root, "route", route)
        except Exception as exc:
            report("route", exc)

    def finish(self, state: str) -> None:
        trace = self.trace
        try:
            if not self.routed:
                self._route()
            if self.disconnected and not self.response_done:
                state = "cancelled"
            if self.body_in is not None:
                self.body_in.close("cancelled" if self.disconnected else "pending")
            if self.body_out is not None:
                self.body_out.close("cancelled" if self.disconnected else "pending")
            trace.finish(_now(), state)
        except Exception as exc:
            report("finish", exc)

    async def traced_receive(self) -> Message:
        """The app's ``receive``: the server's, recorded (a bound method, not a closure)."""
        started = _now()
        message = await self._receive()
        try:
            self._received(message, started, _now())
        except Exception as exc:
            report("receive", exc)
        return message

    def _received(self, message: Message, started: int, ended: int) -> None:
        kind = message.get("type")
        trace = self.trace
        if kind == "http.request":
            body = message.get("body") or b""
            last = not message.get("more_body", False)
            self.body_in = body_chunk(self.body_in, trace, "stream-read",
                                      _current(trace, self.root), started, ended, len(body),
                                      last)  # fmt: skip
        elif kind == "websocket.receive":
            what, size = message_size(message)
            record_message(trace, _current(trace, self.root), "receive", started, ended, what,
                           size)  # fmt: skip
        elif kind == "http.disconnect" and not self.response_done:
            self.disconnected = True
            trace.annotate(self.root, "disconnectedAt", _now() - trace.origin)
        elif kind == "websocket.disconnect":  # the usual way a websocket ends: not an error
            code = message.get("code", 1000)
            trace.annotate(self.root, "closeCode", code)
            # The wait for the client to close is the connection's last wait, often its longest
            # (a chat kept open): without it the trace ends in a stretch nothing explains.
            res = record_message(trace, _current(trace, self.root), "receive", started, ended,
                                 "close", None)  # fmt: skip
            if res is not None:
                trace.annotate(res, "code", code)

    async def traced_send(self, message: Message) -> None:
        """The app's ``send``: the server's, recorded, the response headers given the trace
        when it was asked for."""
        kind = message.get("type")
        if kind in _STARTS:  # a response's status and headers, a websocket's accept
            message = self._on_start(message)
            if kind == "websocket.accept":
                await self._server_send(message)
            else:
                await self._send(message)
            return
        # the usual message; or the body of a websocket's refusal, answered with HTTP
        if kind == "http.response.body" or kind == "websocket.http.response.body":
            last = not message.get("more_body", False)
            started = _now()
            if last:  # _server_send's work in line: the usual response's end, one frame fewer
                self.response_done = True
                token = ACTIVE.set(None)
                try:
                    await self._send(message)
                finally:
                    ACTIVE.reset(token)
            else:
                await self._send(message)
            ended = _now()
            try:
                trace = self.trace
                self.body_out = body_chunk(self.body_out, trace, "stream-write",
                                           _current(trace, self.root), started, ended,
                                           len(message.get("body") or b""), last)  # fmt: skip
            except Exception as exc:
                report("send", exc)
            return
        if kind == "http.response.pathsend":  # the server sends a file as the whole body
            self.response_done = True
            started = _now()
            await self._server_send(message)
            try:
                self._file_sent(message, started, _now())
            except Exception as exc:
                report("send", exc)
            return
        started = _now()
        if kind == "websocket.close":
            await self._server_send(message)
        else:
            await self._send(message)
        if kind == "websocket.send" or kind == "websocket.close":
            try:
                self._sent(message, kind, started, _now())
            except Exception as exc:
                report("send", exc)

    async def _server_send(self, message: Message) -> None:
        """The server's ``send``, run outside the trace: what a server starts as a response
        completes (its last body chunk, or a file it sends) or a websocket opens or closes is
        its own, not the request's (uvicorn arms a 5 s keep-alive timer after every response
        and a 20 s ping timer after an accept, which would otherwise sit in every trace,
        pending, at the end of its critical path)."""
        token = ACTIVE.set(None)
        try:
            await self._send(message)
        finally:
            ACTIVE.reset(token)

    def _file_sent(self, message: Message, started: int, ended: int) -> None:
        """The response body as a file the server sent (the ASGI ``http.response.pathsend``
        extension): one ``stream-write`` with the file's ``path`` and its size then."""
        path = str(message.get("path"))
        size = None
        # what the server sent, unless the file changed since; none when it cannot be read (the
        # server could not send it either, and says so to the app)
        with contextlib.suppress(OSError, ValueError):
            size = os.stat(path).st_size
        trace = self.trace
        res = whole_body(trace, "stream-write", _current(trace, self.root), started, ended, size)
        if res is not None:
            trace.annotate(res, "path", path)

    def _sent(self, message: Message, kind: object, started: int, ended: int) -> None:
        trace = self.trace
        if kind == "websocket.send":
            what, size = message_size(message)
            record_message(trace, _current(trace, self.root), "send", started, ended, what, size)
        elif kind == "websocket.close":
            record_message(trace, _current(trace, self.root), "send", started, ended, "close",
                           None)  # fmt: skip

    def _on_start(self, message: Message) -> Message:
        trace = self.trace
        try:
            status = message.get("status")
            if status is not None:
                trace.request["status"] = status
                trace.annotate(self.root, "status", status)
            trace.annotate(self.root, "responseStartedAt", _now() - trace.origin)
            if not self.requested:
                return message
            self._route()  # the header's trace names it too
            headers = list(message.get("headers") or ())
            headers.append((b"x-async-trace-id", trace.trace_id.encode()))
            headers.append((b"x-async-trace-data", self._inline(headers).encode("ascii")))
            return {**message, "headers": headers}
        except Exception as exc:
            report("response-headers", exc)
            return message

    def _inline(self, headers: list[Any]) -> str:
        """The ``X-Async-Trace-Data`` value beside the response's ``headers``: the trace, or
        where to fetch it when it is over ``header_limit`` (by default, when the headers with
        it would not fit in ``HEADER_BLOCK`` bytes, where a proxy would answer 502)."""
        limit = self.owner.header_limit
        where = (
            f"; GET {self.owner.path_prefix}/traces/{self.trace.trace_id}"
            if self.owner.store is not None
            else ""
        )
        if limit == 0:  # inline traces turned off: nothing serialized for a header
            return f"omitted: header_limit=0{where}"
        why = ""
        if limit is None:
            limit = header_room(headers)
            why = f" (the response's headers kept within {HEADER_BLOCK})"
        encoded = trace_header(self.trace)
        if len(encoded) <= limit:
            return encoded
        return f"omitted: {len(encoded)} bytes > limit {limit}{why}{where}"
