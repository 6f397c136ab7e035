"""The ASGI middleware: decides which requests are traced, runs them inside their trace.

    app = Starlette(routes=routes)
    app.add_middleware(AsyncTraceMiddleware)          # loopback clients, X-Async-Trace: 1
    # or AsyncTraceMiddleware(app, secret="s3cret", sample_rate=0.01)

Requests that are not traced go straight to the app: one header scan, nothing else.
Exports: AsyncTraceMiddleware.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from typing import Any

from . import _instrument
from ._context import ACTIVE
from ._endpoint import serve_store
from ._failures import report
from ._gate import TRACE_REQUESTED, Gate
from ._hooks import TimedCoroutine, acquire_hooks
from ._model import Resource, Trace, TraceLimits
from ._sinks import LogSink, TraceSink, TraceStore, encode_trace_header, global_sinks
from ._streams import BodyStream, message_size, record_message

_check: Callable[[object, bytes, str], object] | None
try:
    from ._speedups import untraced_check as _check
except ImportError:  # built without a compiler: _check_in_python
    _check = None

__all__ = ["AsyncTraceMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_now = time.perf_counter_ns
_TRACEABLE = frozenset(("http", "websocket"))
_HEADER = b"x-async-trace"


def _scan(headers: Any) -> bytes | None:
    """The ``X-Async-Trace`` value, in Python (the C scan hands over unusual header shapes)."""
    for name, value in headers:
        if name == _HEADER:
            return value  # type: ignore[no-any-return]
    return None


class AsyncTraceMiddleware:
    """Per-request async tracing for any ASGI app.

    secret: when set, ``X-Async-Trace: <secret>`` turns tracing on from any client; when
        None (the default), any ``X-Async-Trace`` value but 0/false/off/no does, from
        loopback clients only.
    sample_rate: fraction of requests without the header to trace anyway; their traces go
        to the log and the store, never into response headers.
    header_limit: the most bytes of encoded trace put inline in ``X-Async-Trace-Data``.
    store_size: how many recent traces ``{path_prefix}/traces`` keeps (0: no store, no
        endpoint).
    log_traces: log ``AsyncTrace completed; toJson() = ...`` for every trace.
    sinks: more callables that receive each finished trace and its JSON.
    limits: caps per trace (resources, callbacks, annotations, stacks).
    record_futures: record every future the request creates (off for lighter traces).
    perfetto_path: stream every trace into this .pftrace file too (needs ``perfetto``).
    propagate_to: hosts (``host`` or ``host:port``) that outgoing httpx calls of a traced
        request ask to trace the call too (``X-Async-Trace``, with their secret when given as
        a mapping ``{host: secret}``; ``"1"`` for a list) and name it as their upstream.
    instrument: turn on library instrumentation when the middleware is made: True for every
        one whose library is installed (timers, httpx, caches, ...), a list of names for
        those, False for none (call ``asgi_asynctrace.instrument()`` yourself).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        secret: str | None = None,
        sample_rate: float = 0.0,
        header_limit: int = 8192,
        store_size: int = 100,
        path_prefix: str = "/__asynctrace",
        log_traces: bool = True,
        sinks: Sequence[TraceSink] = (),
        limits: TraceLimits | None = None,
        record_futures: bool = True,
        instrument: bool | Sequence[str] = True,
        perfetto_path: str | os.PathLike[str] | None = None,
        propagate_to: Mapping[str, str] | Sequence[str] = (),
        logger: logging.Logger | None = None,
    ) -> None:
        if header_limit < 0:
            raise ValueError(f"header_limit must be >= 0, got {header_limit}")
        if not path_prefix.startswith("/") or path_prefix.endswith("/"):
            raise ValueError(f"path_prefix must start and not end with '/', got {path_prefix!r}")
        self.app = app
        self.gate = Gate(secret=secret, sample_rate=sample_rate)
        self.header_limit = header_limit
        self.store = TraceStore(store_size) if store_size else None
        self.path_prefix = path_prefix
        self.limits = limits or TraceLimits()
        self.record_futures = record_futures
        named: list[tuple[str, TraceSink]] = []
        if log_traces:
            named.append(("sink:log", LogSink(logger)))
        if self.store is not None:
            named.append(("sink:store", self.store))
        if perfetto_path is not None:
            from ._perfetto import PerfettoSink

            named.append(("sink:perfetto", PerfettoSink(perfetto_path)))
        named.extend((f"sink:{_name(s)}", s) for s in sinks)
        self._sinks = tuple(named)
        self._sampling = sample_rate > 0
        self._store_path = path_prefix if self.store is not None else ""
        hosts = (
            propagate_to if isinstance(propagate_to, Mapping) else dict.fromkeys(propagate_to, "1")
        )
        self.propagate_to = {str(k): str(v) for k, v in hosts.items()}
        if instrument is True:
            _instrument.instrument()
        elif instrument:
            _instrument.instrument(*instrument)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The path of every untraced request: one C call (or, without the accelerator, one
        # header scan and a prefix test), then straight to the app.
        try:
            value = NotImplemented if _check is None else _check(scope, _HEADER, self._store_path)
            if value is None:
                slow = self._sampling
            elif value is True:
                value, slow = None, True
            elif value is NotImplemented:
                value, slow = self._check_in_python(scope)
            else:
                slow = True
        except Exception as exc:
            report("gate", exc)
            slow = False
        # Outside the try: an exception from the app must pass through untouched.
        if slow:
            return await self._slow_path(scope, receive, send, value)  # type: ignore[arg-type]
        return await self.app(scope, receive, send)

    def _check_in_python(self, scope: Scope) -> tuple[Any, bool]:
        if scope["type"] not in _TRACEABLE:
            return None, False
        value = _scan(scope.get("headers") or ())
        slow = (
            value is not None
            or self._sampling
            or (self._store_path != "" and (scope.get("path") or "").startswith(self._store_path))
        )
        return value, slow

    async def _slow_path(
        self, scope: Scope, receive: Receive, send: Send, value: bytes | None
    ) -> None:
        serve = False
        try:
            serve = (
                self.store is not None
                and scope.get("type") == "http"
                and (scope.get("path") or "").startswith(self.path_prefix)
                and self.gate.may_read(scope, value)
            )
            decision = None if serve else self.gate.decide(scope, value)
        except Exception as exc:
            report("gate", exc)
            decision = None
        if serve and self.store is not None:
            if await serve_store(self.store, self.path_prefix, scope, send):
                return None
            decision = self.gate.decide(scope, value)
        if decision is None or ACTIVE.get() is not None:
            # Not traced, or already inside a traced request (a second AsyncTraceMiddleware
            # further in, or an app called in-process by a traced one): the outer trace
            # records this too.
            return await self.app(scope, receive, send)
        return await self._traced(scope, receive, send, decision == TRACE_REQUESTED)

    async def _traced(self, scope: Scope, receive: Receive, send: Send, requested: bool) -> None:
        try:
            run = _TracedRequest(self, scope, requested)
        except Exception as exc:
            report("start-trace", exc)
            return await self.app(scope, receive, send)
        release = run.acquire_hooks()
        token = ACTIVE.set((run.trace, run.trace.root))
        state = "ok"
        try:
            await TimedCoroutine(
                self.app(scope, run.receive(receive), run.send(send)),
                run.trace,
                run.trace.root,
            )
        except asyncio.CancelledError:
            state = "cancelled"
            raise
        except BaseException as exc:
            state = "cancelled" if run.client_gone(exc) else "error"
            raise
        finally:
            ACTIVE.reset(token)
            run.finish(state)
            if release is not None:
                release()
            self._emit(run.trace)

    def _emit(self, trace: Trace) -> None:
        try:
            data = trace.to_json()
        except Exception as exc:
            report("serialize", exc)
            return
        for name, sink in self._sinks:
            try:
                sink(trace, data)
            except Exception as exc:
                report(name, exc)
        for collected in global_sinks():
            collected.append(trace)


_PARENT = re.compile(rb"([0-9a-f]{32}):([0-9]{1,9})")
_TRACEPARENT = re.compile(rb"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def _header(scope: Scope, wanted: bytes) -> bytes | None:
    for name, value in scope.get("headers") or ():
        if name == wanted:
            return value  # type: ignore[no-any-return]
    return None


def _upstream(scope: Scope) -> tuple[str, int] | None:
    """The calling service's trace and fetch, from ``X-Async-Trace-Parent: <trace>:<id>``."""
    value = _header(scope, b"x-async-trace-parent")
    match = _PARENT.fullmatch(value) if value is not None else None
    return (match[1].decode(), int(match[2])) if match else None


def _current(trace: Trace) -> Resource:
    """The resource that is reading or writing: whoever called receive() or send()."""
    active = ACTIVE.get()
    return active[1] if active is not None and active[0] is trace else trace.root


def _name(sink: object) -> str:
    return getattr(sink, "__qualname__", None) or type(sink).__qualname__


class _TracedRequest:
    """The state of one traced request: its trace and what the ASGI messages told us."""

    __slots__ = (
        "body_in",
        "body_out",
        "disconnected",
        "owner",
        "requested",
        "response_done",
        "trace",
        "websocket",
    )

    def __init__(self, owner: AsyncTraceMiddleware, scope: Scope, requested: bool) -> None:
        self.owner = owner
        self.requested = requested
        self.disconnected = False
        self.response_done = False
        self.websocket = scope.get("type") == "websocket"
        method = scope.get("method") or ("WS" if self.websocket else None)
        path = scope.get("path")
        trace = Trace.start(request={"method": method, "path": path}, limits=owner.limits)
        trace.record_futures = owner.record_futures
        trace.propagate_to = owner.propagate_to
        root = trace.root
        trace.annotate(root, "method", method)
        trace.annotate(root, "path", path)
        client = scope.get("client")
        if client:
            trace.annotate(root, "client", str(client[0]))
        trace.annotate(root, "traced", "requested" if requested else "sampled")
        traceparent = _header(scope, b"traceparent")
        if traceparent is not None and _TRACEPARENT.fullmatch(traceparent):
            trace.request["traceparent"] = traceparent.decode()  # for OpenTelemetry export
        parent = _upstream(scope) if requested else None
        if parent is not None:
            trace.request["parent"] = {"traceId": parent[0], "asyncId": parent[1]}
            trace.annotate(root, "upstreamTraceId", parent[0])
            trace.annotate(root, "upstreamAsyncId", parent[1])
        self.trace = trace
        self.body_in = BodyStream(trace, "stream-read")
        self.body_out = BodyStream(trace, "stream-write")

    def acquire_hooks(self) -> Callable[[], None] | None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None  # trio or another loop: record what the middleware sees, no hooks
        try:
            return acquire_hooks(loop)
        except Exception as exc:
            report("hooks", exc)
            return None

    def client_gone(self, exc: BaseException) -> bool:
        return self.disconnected or type(exc).__name__ == "ClientDisconnected"

    def finish(self, state: str) -> None:
        trace = self.trace
        try:
            if self.disconnected and not self.response_done:
                state = "cancelled"
            self.body_in.close("cancelled" if self.disconnected else "pending")
            self.body_out.close("cancelled" if self.disconnected else "pending")
            trace.finish(_now(), state)
        except Exception as exc:
            report("finish", exc)

    def receive(self, receive: Receive) -> Receive:
        async def traced_receive() -> Message:
            started = _now()
            message = await receive()
            try:
                self._received(message, started, _now())
            except Exception as exc:
                report("receive", exc)
            return message

        return traced_receive

    def _received(self, message: Message, started: int, ended: int) -> None:
        kind = message.get("type")
        trace = self.trace
        if kind == "http.request":
            body = message.get("body") or b""
            last = not message.get("more_body", False)
            self.body_in.chunk(_current(trace), started, ended, len(body), last)
        elif kind == "websocket.receive":
            what, size = message_size(message)
            record_message(trace, _current(trace), "receive", started, ended, what, size)
        elif kind == "http.disconnect" and not self.response_done:
            self.disconnected = True
            trace.annotate(trace.root, "disconnectedAt", _now() - trace.origin)
        elif kind == "websocket.disconnect":  # the usual way a websocket ends: not an error
            trace.annotate(trace.root, "closeCode", message.get("code", 1000))

    def send(self, send: Send) -> Send:
        async def traced_send(message: Message) -> None:
            kind = message.get("type")
            if kind == "http.response.start" or kind == "websocket.accept":
                message = self._on_start(message)
            elif kind == "http.response.body" and not message.get("more_body", False):
                self.response_done = True
            started = _now()
            await send(message)
            try:
                self._sent(message, kind, started, _now())
            except Exception as exc:
                report("send", exc)

        return traced_send

    def _sent(self, message: Message, kind: object, started: int, ended: int) -> None:
        trace = self.trace
        if kind == "http.response.body":
            body = message.get("body") or b""
            last = not message.get("more_body", False)
            self.body_out.chunk(_current(trace), started, ended, len(body), last)
        elif kind == "websocket.send":
            what, size = message_size(message)
            record_message(trace, _current(trace), "send", started, ended, what, size)
        elif kind == "websocket.close":
            record_message(trace, _current(trace), "send", started, ended, "close", None)

    def _on_start(self, message: Message) -> Message:
        trace = self.trace
        try:
            status = message.get("status")
            if status is not None:
                trace.request["status"] = status
                trace.annotate(trace.root, "status", status)
            trace.annotate(trace.root, "responseStartedAt", _now() - trace.origin)
            if not self.requested:
                return message
            headers = list(message.get("headers") or ())
            headers.append((b"x-async-trace-id", trace.trace_id.encode()))
            headers.append((b"x-async-trace-data", self._inline().encode("ascii")))
            return {**message, "headers": headers}
        except Exception as exc:
            report("response-headers", exc)
            return message

    def _inline(self) -> str:
        limit = self.owner.header_limit
        data = self.trace.to_json()
        encoded = encode_trace_header(data) if limit else ""
        if limit and len(encoded) <= limit:
            return encoded
        where = (
            f"; GET {self.owner.path_prefix}/traces/{self.trace.trace_id}"
            if self.owner.store is not None
            else ""
        )
        return f"omitted: {len(encoded) or len(data)} bytes > limit {limit}{where}"
