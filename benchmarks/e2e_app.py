"""The sample app for the end-to-end benchmark: every variant in one process, switched between
wrk runs, so that the variants share one interpreter, one heap layout and one set of warmed-up
caches, and their ratios measure the middleware rather than the process they happen to run in.

    uvicorn benchmarks.e2e_app:app
    curl -X POST http://127.0.0.1:8000/__bench/variant/sampled     # then drive it with wrk

Variants: ``bare`` (no middleware, no instrumentation, no hooks), ``floor`` (a do-nothing
middleware, the same), ``idle`` (the middleware, instrumentation on, nothing traced, so the
hooks were never installed), ``hooks`` (the same with the hooks on, as after a first traced
request), ``sampled`` (1 % of requests traced: the hooks go on with the first and stay) and
``sampled10`` (10 %: ten times as many traced requests, so what each one costs stands well
clear of the rounds' noise); ``stored`` (the middleware with ``header_limit=0``: a request that
asks for a trace gets it in the store, not in its response header; ``hooks`` serves the same
request with the trace in the header).
Switching puts the process in the variant's state; the caller then runs an untimed warm-up,
since changing classes (the loop's, the instrumented libraries') makes CPython re-learn its
specialized lookups.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from typing import Any

from starlette.applications import Starlette

from asgi_asynctrace import AsyncTraceMiddleware, instrument, uninstrument
from asgi_asynctrace._hooks import install_hooks, uninstall_hooks
from sample_app import patterns
from sample_app.app import app as sample

from .bench_hooks import PassThrough

CONTROL = "/__bench/variant/"
# GET: the time the collector ran and its full collections since the last GET, as JSON.
GC_STATS = "/__bench/gc"
logging.getLogger("asgi_asynctrace.trace").setLevel(logging.WARNING)
bare = Starlette(routes=sample.routes, lifespan=patterns.lifespan)


apps: dict[str, Any] = {
    "bare": bare,
    "floor": PassThrough(bare),
    "idle": AsyncTraceMiddleware(bare, log_traces=False),
    "hooks": AsyncTraceMiddleware(bare, log_traces=False),
    "sampled": AsyncTraceMiddleware(bare, log_traces=False, sample_rate=0.01),
    "sampled10": AsyncTraceMiddleware(bare, log_traces=False, sample_rate=0.1),
    # For the latency table: a request that asks (X-Async-Trace) traced to the store only.
    "stored": AsyncTraceMiddleware(bare, log_traces=False, header_limit=0),
}


class _Collections:
    """The collector's running time (clock time; the server is one thread on one CPU, so
    close to CPU time) and full collections, counted through ``gc.callbacks``."""

    def __init__(self) -> None:
        self.ns = self.full = self._started = 0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter_ns()
            return
        self.ns += time.perf_counter_ns() - self._started
        self.full += info["generation"] == 2

    def take(self) -> bytes:
        out = json.dumps({"ns": self.ns, "full": self.full}).encode()
        self.ns = self.full = 0
        return out


collections = _Collections()


class Switch:
    """Serves the current variant; ``POST /__bench/variant/<name>`` switches to another."""

    def __init__(self) -> None:
        self.current = apps["bare"]
        uninstrument()  # the middlewares turned it on when they were made

    @staticmethod
    def state(variant: str) -> None:
        uninstall_hooks()  # as in a process that never traced a request; sampled: until it does
        if variant in ("bare", "floor"):
            uninstrument()
        else:
            instrument()
        if variant == "hooks":  # as after the first traced request: on for good
            install_hooks()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == GC_STATS:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": collections.take()})
            return
        if scope["type"] == "http" and scope["path"].startswith(CONTROL):
            variant = scope["path"][len(CONTROL) :]
            status = 200 if variant in apps else 404
            if status == 200:
                self.state(variant)
                self.current = apps[variant]
            await send({"type": "http.response.start", "status": status, "headers": []})
            await send({"type": "http.response.body", "body": variant.encode()})
            return
        await self.current(scope, receive, send)


app = Switch()
