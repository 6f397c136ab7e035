"""An app that answers with a file, for servers that send files themselves (granian, through
the ASGI ``http.response.pathsend`` extension): ``FILES_APP_FILE`` names the file.

    python -m granian --interface asgi tests.files_app:app --port 8000
"""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import Route

from asgi_asynctrace import AsyncTraceMiddleware


async def index(request: Request) -> Response:
    return PlainTextResponse("up")


async def file(request: Request) -> Response:
    extensions = request.scope.get("extensions") or {}
    return FileResponse(os.environ["FILES_APP_FILE"], headers={
        "x-pathsend": "1" if "http.response.pathsend" in extensions else "0"})  # fmt: skip


app = AsyncTraceMiddleware(
    Starlette(routes=[Route("/", index), Route("/file", file)]), log_traces=False
)
