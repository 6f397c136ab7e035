"""aiohttp client calls as ``fetch`` resources, through aiohttp's own extension point (its
``TraceConfig`` signals): one per request, redirects included, alive until its response's
headers arrive (aiohttp signals no end of the body).

    from asgi_asynctrace.instrumentation.aiohttp import trace_config
    session = aiohttp.ClientSession(trace_configs=[trace_config()])

Or ``asgi_asynctrace.instrument("aiohttp")`` once at startup: every ``ClientSession`` created
afterwards gets it. Annotations as httpx's fetches: ``method``, ``url`` (userinfo stripped,
query values masked), ``queryDigest``, ``status``, ``redirects``, ``error``; toward the hosts
in the middleware's ``propagate_to`` the call carries the trace on, as httpx's do.
Exports: trace_config, AiohttpInstrumentation.
"""

from __future__ import annotations

import time
from types import ModuleType, SimpleNamespace
from typing import Any

import aiohttp

from asgi_asynctrace._context import ACTIVE, new_resource, settle_from_exception
from asgi_asynctrace._failures import report

from ._base import Instrumentation
from ._fetch import mask_query, propagation, query_digest

__all__ = ["AiohttpInstrumentation", "trace_config"]

_now = time.perf_counter_ns


def _url_shown(url: Any) -> str:
    """The URL without userinfo, and with every query value replaced by ``*``."""
    clean = url.with_user(None)
    query = url.raw_query_string
    if not query:
        return str(clean)
    return f"{clean.with_query(None).with_fragment(None)}?{mask_query(query)}"


async def _start(session: Any, ctx: SimpleNamespace, params: Any) -> None:
    ctx.asynctrace = None
    active = ACTIVE.get()
    if active is None or active[0].closed:
        return
    trace = active[0]
    try:
        res = new_resource("fetch", trace, active[1])
        if res is None:
            return
        url = params.url
        trace.annotate(res, "method", params.method)
        trace.annotate(res, "url", _url_shown(url))
        if url.raw_query_string:
            trace.annotate(res, "queryDigest", query_digest(url.raw_query_string.encode()))
        if trace.propagate_to and url.host:
            params.headers.update(propagation(trace, res, url.host, url.port or 80))
        ctx.asynctrace = (trace, res)
    except Exception as exc:
        report("aiohttp", exc)


def _finished(ctx: SimpleNamespace, params: Any, exc: BaseException | None) -> None:
    """The request answered (its headers in) or failed: its fetch settles."""
    recorded = getattr(ctx, "asynctrace", None)
    if recorded is None:
        return
    trace, res = recorded
    try:
        now = _now()
        if exc is not None:
            settle_from_exception(trace, res, now, exc)
            return
        response = params.response
        trace.annotate(res, "status", response.status)
        if response.history:
            trace.annotate(res, "redirects", len(response.history))
        trace.settle(res, now, "ok")
    except Exception as failure:
        report("aiohttp", failure)


async def _end(session: Any, ctx: SimpleNamespace, params: Any) -> None:
    _finished(ctx, params, None)


async def _failed(session: Any, ctx: SimpleNamespace, params: Any) -> None:
    _finished(ctx, params, params.exception)


def trace_config() -> aiohttp.TraceConfig:
    """A ``TraceConfig`` that records each request of a session inside a traced request;
    outside one, each of its signals costs one context lookup."""
    config = aiohttp.TraceConfig()
    config.on_request_start.append(_start)
    config.on_request_end.append(_end)
    config.on_request_exception.append(_failed)
    return config


class AiohttpInstrumentation(Instrumentation):
    """The global switch: adds the trace config to every ``ClientSession`` made after install."""

    name = "aiohttp"
    library = "aiohttp"
    supported = (3, 9)

    def _install(self, module: ModuleType) -> None:
        session_class = module.ClientSession
        original_init = session_class.__init__
        ours = trace_config()

        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            try:
                configs = list(kwargs.get("trace_configs") or ())
                if not any(_start in c.on_request_start for c in configs):
                    kwargs["trace_configs"] = [*configs, ours]
            except Exception as exc:  # trace_configs of a shape we do not know: left alone
                report("aiohttp", exc)
            original_init(self, *args, **kwargs)

        self.patches.replace(session_class, "__init__", __init__)


instrumentation = AiohttpInstrumentation()
