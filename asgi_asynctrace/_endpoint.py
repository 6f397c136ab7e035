"""The trace store over HTTP, and the viewer that reads it.

    handled = await serve_store(store, "/__asynctrace", scope, send)

``GET {prefix}/`` is the viewer page; ``GET {prefix}/traces`` lists the stored traces, newest
first; ``GET {prefix}/traces/{id}`` is one trace's JSON, and with ``?analysis=1`` the trace and
the analyzer's result together (what the viewer loads); ``GET {prefix}/routes`` the stored
traces by route (as ``asgi-asynctrace routes`` gives them, each with its slowest trace compared
with its typical one, as ``compare`` does), worked out in the loop's thread pool;
``GET {prefix}/status`` what the tracer in this process is set to and has done (its version,
the loop, how it gates requests, the store, each instrumentation's state, its own failures).

Returns False for paths it does not own, so the request goes on to the app.
Exports: serve_store.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any, TypeVar

import orjson

from ._analysis import AnalysisSettings, analyze
from ._blockers import name_blockers
from ._failures import report
from ._load import load_trace
from ._routes import RouteInput, route_input, routes_with_comparisons
from ._sinks import TraceStore
from ._viewer import viewer_html

__all__ = ["serve_store"]

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
T = TypeVar("T")


# The viewer runs only its own inline code and talks only to this app.
_CSP = (
    b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    b"connect-src 'self'; img-src data:"
)


async def _respond(
    send: Send, status: int, body: bytes, content_type: bytes = b"application/json"
) -> None:
    extra = [(b"content-security-policy", _CSP)] if content_type.startswith(b"text/html") else []
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                *extra,
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
                (b"x-content-type-options", b"nosniff"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _off_loop(store: TraceStore, read: Callable[..., T], *args: Any) -> T:
    """``read(*args)``: in the loop's thread pool when the store reads files (a directory
    shared by workers), so that listing a hundred traces never holds up the app's requests."""
    if store.shared is None:
        return read(*args)
    return await asyncio.get_running_loop().run_in_executor(None, read, *args)


async def serve_store(
    store: TraceStore,
    prefix: str,
    scope: MutableMapping[str, Any],
    send: Send,
    settings: AnalysisSettings | None = None,
    about: Mapping[str, Any] | None = None,
) -> bool:
    path: str = scope.get("path") or ""
    rest = path[len(prefix) :]
    viewer = rest in ("", "/")
    routes = rest in ("/routes", "/routes/")
    status = rest in ("/status", "/status/")
    if (not viewer and not routes and not status and rest not in ("/traces", "/traces/")
            and not rest.startswith("/traces/")):  # fmt: skip
        return False
    if scope.get("method", "GET") != "GET":
        await _respond(send, 405, orjson.dumps({"error": "only GET is supported here"}))
        return True
    if status:
        await _respond(send, 200, orjson.dumps(_status(store, about or {})))
        return True
    if viewer:
        page = viewer_html(store_url=prefix + "/")
        await _respond(send, 200, page, b"text/html; charset=utf-8")
        return True
    if routes:  # every stored trace analysed: too much work for the loop's own thread
        loop = asyncio.get_running_loop()
        body = await loop.run_in_executor(None, _routes_of, store, settings)
        await _respond(send, 200, body)
        return True
    trace_id = rest[len("/traces/") :].strip("/")
    if not trace_id:
        await _respond(send, 200, orjson.dumps({"traces": await _off_loop(store, store.summaries)}))
        return True
    data = await _off_loop(store, store.get, trace_id)
    if data is None:
        message = f"no trace {trace_id[:64]!r} in the store (it keeps the last {store.max_traces})"
        if store.shared is None:  # the most common surprise: another worker process has it
            message += (f" of this process ({os.getpid()}); under several worker processes "
                        "each has its own unless they share one through store_dir")  # fmt: skip
        await _respond(send, 404, orjson.dumps({"error": message}))
        return True
    query = scope.get("query_string") or b""
    if b"analysis=1" in query.split(b"&"):
        # off the loop: naming who held the loop may load other stored traces
        loop = asyncio.get_running_loop()
        analysis = await loop.run_in_executor(None, _analysed, store, trace_id, data, settings)
        data = orjson.dumps({"trace": orjson.Fragment(data), "analysis": analysis})
    await _respond(send, 200, data)
    return True


def _analysed(
    store: TraceStore, trace_id: str, data: bytes, settings: AnalysisSettings | None
) -> dict[str, Any]:
    """The trace's analysis; where the loop was busy elsewhere while it waited, with the
    steps of this process's other stored traces that ran then (the trace must be this
    process's own: another worker's ran on another loop)."""
    trace = load_trace(data)
    analysis = analyze(trace, settings)
    busy = [w for f in analysis.findings if f.kind == "loop-busy" for w in f.windows]
    if busy and store.holds(trace_id):
        base = trace.started_at_unix_ns
        others = store.around(base + min(a for a, _ in busy), base + max(b for _, b in busy))
        analysis = name_blockers(analysis, trace, others)
    return analysis.to_dict()


def _status(store: TraceStore, about: Mapping[str, Any]) -> dict[str, Any]:
    """What ``GET {prefix}/status`` answers: this process's tracer, as it is now."""
    import importlib.metadata
    import platform
    import sys

    from ._failures import failure_counts
    from ._hooks import hooks_on_ns
    from ._instrument import instrumentation_states

    try:
        version = importlib.metadata.version("asgi-asynctrace")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        version = "unknown"
    loop = type(asyncio.get_running_loop())
    return {
        "version": version,
        "python": platform.python_version(),
        "pid": os.getpid(),
        "accelerator": sys.modules.get(__package__ + "._speedups") is not None,
        "loop": f"{loop.__module__}.{loop.__qualname__}",
        "hooksOnSeconds": round(hooks_on_ns() / 1e9, 3),
        "store": {
            "traces": len(store),
            "keeps": store.max_traces,
            "sharedDirectory": store.shared is not None,
        },
        "middleware": dict(about),
        "instrumentation": instrumentation_states(),
        "failures": failure_counts(),
    }


# trace id -> what the routes table reads of it, per store: a stored trace is finished, so its
# analysis never changes; only the traces still listed are kept from one call to the next.
_route_inputs: weakref.WeakKeyDictionary[TraceStore, dict[str, RouteInput]] = (
    weakref.WeakKeyDictionary()
)


def _routes_of(store: TraceStore, settings: AnalysisSettings | None) -> bytes:
    """``{"traces": n, "routes": [...]}``: the store's traces by route, the slowest first."""
    known = _route_inputs.get(store, {})
    kept: dict[str, RouteInput] = {}
    for summary in store.summaries():
        trace_id = summary.get("traceId")
        if not isinstance(trace_id, str):
            continue
        found = known.get(trace_id)
        if found is None:
            try:
                trace = store.trace(trace_id)
                if trace is None:  # fell out of the store meanwhile
                    continue
                found = route_input(trace, analyze(trace, settings))
            except Exception as exc:  # one bad trace (another worker's cut file) loses no other
                report("routes", exc)
                continue
        kept[trace_id] = found
    _route_inputs[store] = kept
    routes = routes_with_comparisons(list(kept.values()))
    return orjson.dumps({"traces": len(kept), "routes": routes})
