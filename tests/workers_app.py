"""An app served by several worker processes that share the trace store through a directory
(``WORKERS_STORE_DIR``); its one route blocks for a moment, so that requests made together are
spread over the workers, and says which process answered. ``WORKERS_STORE_SIZE=0``: no store;
``WORKERS_SECRET``: the secret that turns tracing on.

    python -m uvicorn tests.workers_app:app --workers 2 --port 8000
"""

from __future__ import annotations

import os
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_asynctrace import AsyncTraceMiddleware


async def index(request: Request) -> Response:
    return PlainTextResponse("up")


async def pid(request: Request) -> Response:
    time.sleep(0.2)  # holds this worker's loop: the next connection goes to another worker
    return PlainTextResponse(str(os.getpid()))


app = AsyncTraceMiddleware(
    Starlette(routes=[Route("/", index), Route("/pid", pid)]),
    log_traces=False,
    store_dir=os.environ.get("WORKERS_STORE_DIR") or None,
    store_size=int(os.environ.get("WORKERS_STORE_SIZE", "100")),  # 0: no store
    secret=os.environ.get("WORKERS_SECRET") or None,
)
