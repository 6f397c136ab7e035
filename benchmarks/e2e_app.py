"""The sample app for the end-to-end benchmark, in the variant named by ASYNCTRACE_BENCH_VARIANT:
``bare`` (no middleware, no instrumentation), ``floor`` (a do-nothing middleware), ``idle``
(the middleware, nothing traced) or
``sampled`` (1 % of requests traced).

    ASYNCTRACE_BENCH_VARIANT=idle uvicorn benchmarks.e2e_app:app
"""

from __future__ import annotations

import logging
import os

from starlette.applications import Starlette

from asgi_asynctrace import AsyncTraceMiddleware, uninstrument
from sample_app import patterns
from sample_app.app import app as sample

VARIANT = os.environ.get("ASYNCTRACE_BENCH_VARIANT", "bare")
bare = Starlette(routes=sample.routes, lifespan=patterns.lifespan)
logging.getLogger("asgi_asynctrace.trace").setLevel(logging.WARNING)

if VARIANT == "bare":
    uninstrument()  # importing the sample app turned it on
    app = bare
elif VARIANT == "idle":
    app = AsyncTraceMiddleware(bare, log_traces=False)  # type: ignore[assignment]
elif VARIANT == "floor":  # the cheapest possible ASGI middleware: what any layer costs

    class PassThrough:
        def __init__(self, inner: object) -> None:
            self.inner = inner

        async def __call__(self, scope: object, receive: object, send: object) -> None:
            await self.inner(scope, receive, send)  # type: ignore[operator]

    uninstrument()
    app = PassThrough(bare)  # type: ignore[assignment]
elif VARIANT == "sampled":
    app = AsyncTraceMiddleware(bare, log_traces=False, sample_rate=0.01)  # type: ignore[assignment]
else:
    raise SystemExit(f"ASYNCTRACE_BENCH_VARIANT: bare, floor, idle or sampled, not {VARIANT!r}")
