"""The trace store over HTTP: ``GET {prefix}/traces`` and ``GET {prefix}/traces/{id}``.

    handled = await serve_store(store, "/__asynctrace", scope, send)

Returns False for paths it does not own, so the request goes on to the app.
Exports: serve_store.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from ._sinks import TraceStore

__all__ = ["serve_store"]

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


async def _respond(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
                (b"x-content-type-options", b"nosniff"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def serve_store(
    store: TraceStore, prefix: str, scope: MutableMapping[str, Any], send: Send
) -> bool:
    path: str = scope.get("path") or ""
    rest = path[len(prefix) :]
    if rest not in ("/traces", "/traces/") and not rest.startswith("/traces/"):
        return False
    if scope.get("method", "GET") != "GET":
        await _respond(send, 405, orjson.dumps({"error": "only GET is supported here"}))
        return True
    trace_id = rest[len("/traces/") :].strip("/")
    if not trace_id:
        await _respond(send, 200, orjson.dumps({"traces": store.summaries()}))
        return True
    data = store.get(trace_id)
    if data is None:
        message = f"no trace {trace_id[:64]!r} in the store (it keeps the last {store.max_traces})"
        await _respond(send, 404, orjson.dumps({"error": message}))
        return True
    await _respond(send, 200, data)
    return True
