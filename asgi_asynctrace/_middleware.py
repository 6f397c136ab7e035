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
import math
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from . import _instrument, _stacks, _threads
from ._analysis import AnalysisSettings
from ._context import ACTIVE
from ._endpoint import serve_store
from ._failures import report
from ._gate import TRACE_REQUESTED, TRACE_SAMPLED, Gate
from ._hooks import LINGER_S, hold_hooks
from ._model import Trace, TraceLimits
from ._request import Receive, Scope, Send, TracedRequest, trace_settings
from ._sinks import HEADER_BLOCK, LogSink, TraceSink, TraceStore, global_sinks
from ._tasks import TimedCoroutine, mark_coroutine_function
from ._watchdog import unwatch, watch

_check: Callable[[object, bytes, str], object] | None
try:
    from ._speedups import untraced_check as _check
except ImportError:  # built without a compiler: _check_in_python
    _check = None

__all__ = ["AsyncTraceMiddleware"]

ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_now = time.perf_counter_ns
_TRACEABLE = frozenset(("http", "websocket"))
_HEADER = b"x-async-trace"
_random = random.random
_clock = time.monotonic
_running_loop = asyncio._get_running_loop
# What __call__ passes on as the header value of a request it sampled: decided once, there.
_SAMPLED: Any = object()


class _Budget:
    """At most ``rate`` sampled traces a second, up to a second's worth at once (a token
    bucket, on the loop's thread): what bounds sampling's cost when traffic surges."""

    __slots__ = ("at", "burst", "rate", "tokens")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = max(1.0, rate)
        self.tokens = self.burst
        self.at = _clock()

    def take(self) -> bool:
        now = _clock()
        tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens
        return False


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
    max_sampled_per_s: at most this many sampled traces a second (a second's worth at once);
        None: no cap. Requests that ask with the header are not counted.
    header_limit: the most bytes of encoded trace put inline in ``X-Async-Trace-Data`` (0:
        none). None (the default): as many as keep the response's headers within 4,096
        bytes, which a reverse proxy such as nginx reads into one buffer (a response whose
        headers do not fit gets a 502 there); a bigger trace's header says where to fetch it.
    store_size: how many recent traces ``{path_prefix}/traces`` keeps (0: no store, no
        endpoint).
    store_dir: a directory the app's worker processes share the store through (under
        ``uvicorn --workers N`` or gunicorn each process has its own store, and the endpoint
        answers from whichever one the request lands on): every trace is also written there,
        and each worker serves the others' traces from it.
    log_traces: log ``AsyncTrace completed; toJson() = ...`` for every trace.
    sinks: more callables that receive each finished trace and its JSON.
    limits: caps per trace (resources, callbacks, annotations, stacks).
    record_futures: record the futures the request creates (off for lighter traces); a
        ``sleep``'s, ``wait_for``'s and ``asyncio.wait``'s own are never recorded (their
        timer or task says what was waited for).
    perfetto_path: stream every trace into this .pftrace file too (needs ``perfetto``).
    propagate_to: hosts (``host`` or ``host:port``) that outgoing httpx calls of a traced
        request ask to trace the call too (``X-Async-Trace``, with their secret when given as
        a mapping ``{host: secret}``; ``"1"`` for a list) and name it as their upstream.
    instrument: turn on library instrumentation when the middleware is made: True for every
        one whose library is installed (timers, httpx, caches, ...; one the app has not
        imported yet goes on when the app imports it, and is never imported for it), a list
        of names for those, False for none (call ``asgi_asynctrace.instrument()`` yourself).
    analysis: the thresholds of the findings the trace store serves with each trace (and the
        viewer shows); the defaults when None.
    blocked_sample_ms: when a step of a traced request has run this long on the loop without
        yielding, a watchdog thread takes its stack (and again at 2, 4, 8... times as long),
        so the trace says where the loop was blocked; the same watch records the garbage
        collections the request's steps ran as ``gc`` resources. None: neither.
    hooks_linger: seconds the asyncio hooks stay on after the last traced request ends;
        by default (infinity) they stay until the loop closes, since outside traced requests
        they are C pass-throughs that cost nothing measurable, while taking them off and on
        again makes CPython re-learn the loop's lookups; 0 takes them off at once.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        secret: str | None = None,
        sample_rate: float = 0.0,
        max_sampled_per_s: float | None = None,
        header_limit: int | None = None,
        store_size: int = 100,
        store_dir: str | os.PathLike[str] | None = None,
        path_prefix: str = "/__asynctrace",
        log_traces: bool = True,
        sinks: Sequence[TraceSink] = (),
        limits: TraceLimits | None = None,
        record_futures: bool = True,
        instrument: bool | Sequence[str] = True,
        perfetto_path: str | os.PathLike[str] | None = None,
        propagate_to: Mapping[str, str] | Sequence[str] = (),
        logger: logging.Logger | None = None,
        analysis: AnalysisSettings | None = None,
        hooks_linger: float = LINGER_S,
        blocked_sample_ms: float | None = 20.0,
    ) -> None:
        if blocked_sample_ms is not None and not 0 < blocked_sample_ms < math.inf:
            raise ValueError(
                f"blocked_sample_ms must be > 0 milliseconds or None, got {blocked_sample_ms}"
            )
        # Nanoseconds a traced step runs before the watchdog takes its stack; 0: it never does.
        self._blocked_ns = 0 if blocked_sample_ms is None else max(1, int(blocked_sample_ms * 1e6))
        if header_limit is not None and header_limit < 0:
            raise ValueError(f"header_limit must be >= 0 or None, got {header_limit}")
        if max_sampled_per_s is not None and not 0 < max_sampled_per_s < math.inf:
            raise ValueError(
                f"max_sampled_per_s must be > 0 traces a second or None, got {max_sampled_per_s}"
            )
        self._budget = None if max_sampled_per_s is None else _Budget(float(max_sampled_per_s))
        if not hooks_linger >= 0:
            raise ValueError(f"hooks_linger must be >= 0 seconds, got {hooks_linger}")
        self.hooks_linger = float(hooks_linger)
        if not path_prefix.startswith("/") or path_prefix.endswith("/"):
            raise ValueError(f"path_prefix must start and not end with '/', got {path_prefix!r}")
        self.app = app
        self.gate = Gate(secret=secret, sample_rate=sample_rate)
        self.header_limit = header_limit
        if store_dir is not None and not store_size:
            raise ValueError("store_dir shares the store between workers: it needs store_size > 0")
        self.store = TraceStore(store_size, store_dir) if store_size else None
        self.path_prefix = path_prefix
        self.limits = limits or TraceLimits()
        self.record_futures = record_futures
        self.analysis = analysis or AnalysisSettings()
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
        self._sample_rate = sample_rate
        self._store_path = path_prefix if self.store is not None else ""
        hosts = (
            propagate_to if isinstance(propagate_to, Mapping) else dict.fromkeys(propagate_to, "1")
        )
        self.propagate_to = {str(k): str(v) for k, v in hosts.items()}
        # What each trace is made with, in one C call (None without the accelerator).
        self._trace_settings = trace_settings(self)
        # What the store's status says of these settings (the secret's presence, never it).
        self._about = {
            "pathPrefix": path_prefix, "access": "secret" if secret else "loopback",
            "sampleRate": sample_rate, "maxSampledPerS": max_sampled_per_s,
            "logTraces": log_traces,
            "headerLimit": (f"what keeps the headers within {HEADER_BLOCK} bytes"
                            if header_limit is None else header_limit),
            "recordFutures": record_futures, "blockedSampleMs": blocked_sample_ms,
            "propagateTo": sorted(self.propagate_to),
        }  # fmt: skip
        # What the first traced request would otherwise wait for: done here, at start-up.
        _threads.prepare()
        if instrument is True:
            _instrument.instrument()
        elif instrument:
            _instrument.instrument(*instrument)

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # The path of every untraced request: one C call (or, without the accelerator, one
        # header scan and a prefix test), then the app's own coroutine is handed back for the
        # server to await: no frame of ours stays in the request's await chain, which every
        # step of the request would otherwise pass through. (Marked a coroutine function
        # below, for servers that check before choosing the ASGI 3 interface.)
        try:
            value = NotImplemented if _check is None else _check(scope, _HEADER, self._store_path)
            if value is None:  # sampled here, so an unsampled request costs one random()
                slow = self._sampling and _random() < self._sample_rate and self._within_budget()
                if slow:
                    value = _SAMPLED
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
            if value is _SAMPLED:  # no gate to ask: straight to the traced run
                if ACTIVE.get() is not None:  # inside a traced request: the outer trace has it
                    return self.app(scope, receive, send)
                return self._traced(scope, receive, send, False)
            return self._slow_path(scope, receive, send, value)  # type: ignore[arg-type]
        return self.app(scope, receive, send)

    # What uvicorn, hypercorn and others ask to tell an ASGI 3 app.
    mark_coroutine_function(__call__)

    def _check_in_python(self, scope: Scope) -> tuple[Any, bool]:
        if scope["type"] not in _TRACEABLE:
            return None, False
        value = _scan(scope.get("headers") or ())
        if value is not None or (
            self._store_path != "" and (scope.get("path") or "").startswith(self._store_path)
        ):
            return value, True
        if self._sampling and _random() < self._sample_rate and self._within_budget():
            return _SAMPLED, True
        return None, False

    def _within_budget(self) -> bool:
        """A request sampled: may it be traced under ``max_sampled_per_s``?"""
        if self._budget is None:
            return True
        try:
            return self._budget.take()
        except Exception as exc:  # never the app's problem: that request goes untraced
            report("sample-budget", exc)
            return False

    def _slow_path(
        self, scope: Scope, receive: Receive, send: Send, value: bytes | None
    ) -> Awaitable[None]:
        """A request that asks for a trace, or for the store: decided here, before the server
        awaits it, so that a traced request's await chain holds no coroutine of this one."""
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
        if serve:
            return self._serve(scope, receive, send, value)
        return self._run(scope, receive, send, decision)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, value: bytes | None) -> None:
        """The store's endpoint; a path under it that is none of the endpoint's goes on to the
        app, traced as asked."""
        if self.store is not None and await serve_store(
            self.store, self.path_prefix, scope, send, self.analysis, self._about
        ):
            return None
        return await self._run(scope, receive, send, self.gate.decide(scope, value))

    def _run(self, scope: Scope, receive: Receive, send: Send, decision: Any) -> Awaitable[None]:
        if decision == TRACE_SAMPLED and not self._within_budget():
            decision = None
        if decision is None or ACTIVE.get() is not None:
            # Not traced, or already inside a traced request (a second AsyncTraceMiddleware
            # further in, or an app called in-process by a traced one): the outer trace
            # records this too.
            return self.app(scope, receive, send)
        return self._traced(scope, receive, send, decision == TRACE_REQUESTED)

    async def _traced(self, scope: Scope, receive: Receive, send: Send, requested: bool) -> None:
        try:
            run = TracedRequest(self, scope, requested, receive, send)
        except Exception as exc:
            report("start-trace", exc)
            return await self.app(scope, receive, send)
        loop = _running_loop()  # None under trio or another loop: no hooks, what we see here
        hooks = None
        if loop is not None:
            try:
                hooks = hold_hooks(loop)
            except Exception as exc:
                report("hooks", exc)
        if self._blocked_ns:
            watch(run.trace, self._blocked_ns)
        token = ACTIVE.set((run.trace, run.root))
        state = "ok"
        try:
            await TimedCoroutine(
                self.app(scope, run.traced_receive, run.traced_send), run.trace, run.root
            )
        except asyncio.CancelledError:
            state = "cancelled"
            raise
        except BaseException as exc:
            state = "cancelled" if run.client_gone(exc) else "error"
            raise
        finally:
            ACTIVE.reset(token)
            if self._blocked_ns:
                unwatch(run.trace)
            run.finish(state)
            if hooks is not None:
                try:
                    hooks.let_go(loop, self.hooks_linger)  # type: ignore[arg-type]
                except Exception as exc:  # never the app's problem
                    report("hooks", exc)
            self._emit(run.trace)

    def _emit(self, trace: Trace) -> None:
        # The JSON only when a sink will read it (see TraceSink.needs_json): the store keeps
        # a trace nobody asked the bytes of as it is, and serializes it when it is read.
        data: bytes | None = None
        wanted = []
        for name, sink in self._sinks:
            try:
                needs = getattr(sink, "needs_json", True)
            except Exception as exc:
                report(name, exc)
                continue
            if needs and data is None:
                try:
                    data = trace.to_json()
                except Exception as exc:
                    report("serialize", exc)
                    return
            wanted.append((name, sink))
        for name, sink in wanted:
            try:
                sink(trace, data)  # type: ignore[arg-type]  # None: it said needs_json = False
            except Exception as exc:
                report(name, exc)
        for collected in global_sinks():
            collected.append(trace)


def _name(sink: object) -> str:
    return getattr(sink, "__qualname__", None) or type(sink).__qualname__


# A request begins at the coroutine that runs the app: a creation stack stops there, without
# the server's frames outside it (uvicorn's run_asgi and its middleware, the same for every
# request), and spends its depth on the request's own.
_stacks.stop_at(AsyncTraceMiddleware._traced.__code__)
