"""httpx calls as ``fetch`` resources: one per request hop, alive until the body is read.

    from asgi_asynctrace.instrumentation.httpx import TracingTransport
    client = httpx.AsyncClient(transport=TracingTransport())        # wraps the default one
    client = httpx.AsyncClient(transport=TracingTransport(httpx.MockTransport(handler)))

Toward the hosts given to the middleware's ``propagate_to``, a call carries ``X-Async-Trace``
and ``X-Async-Trace-Parent: <trace id>:<fetch id>``, so a service there running the same
middleware traces it too, and ``asgi-asynctrace join`` puts the two traces together.

Or ``asgi_asynctrace.instrument("httpx")`` once at startup: every ``AsyncClient`` created
afterwards gets its transports wrapped. Clients created before that call, sync ``httpx.Client``
and transports swapped in later by hand are not covered; wrap those yourself.
Exports: TracingTransport, HttpxInstrumentation, safe_url.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any

import httpx

from asgi_asynctrace._context import ACTIVE, new_resource, settle_from_exception
from asgi_asynctrace._failures import report
from asgi_asynctrace._model import Resource, Trace

from ._base import Instrumentation
from ._fetch import mask_query as _masked
from ._fetch import propagation, query_digest

__all__ = ["HttpxInstrumentation", "TracingTransport", "safe_url"]

_now = time.perf_counter_ns


def safe_url(url: httpx.URL, mask_query: bool = True) -> str:
    """The URL without userinfo, and with every query value replaced by ``*``."""
    clean = url.copy_with(username=None, password=None)
    if mask_query and url.query:
        masked = _masked(url.query.decode("ascii", "replace"))
        clean = clean.copy_with(query=masked.encode("ascii", "replace"))
    return str(clean)


class _TracedBody(httpx.AsyncByteStream):
    """The response body: the fetch settles when it is fully read, fails or is closed."""

    def __init__(self, inner: Any, trace: Trace, res: Resource) -> None:
        self._inner = inner
        self._trace = trace
        self._res = res
        self._size = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                self._size += len(chunk)
                yield chunk
        except BaseException as exc:
            self._settle(exc)
            raise
        self._settle(None)

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._settle(None)

    def _settle(self, exc: BaseException | None) -> None:
        trace, res = self._trace, self._res
        if res.settled_at is not None or trace.closed:
            return
        now = _now()
        trace.annotate(res, "responseBytes", self._size)
        if exc is None:
            trace.settle(res, now, "ok")
        else:
            settle_from_exception(trace, res, now, exc)


def _propagate(request: httpx.Request, trace: Trace, res: Resource) -> None:
    """Toward an allowed host, ask the service there to trace this call and name its parent."""
    url = request.url
    port = url.port or (443 if url.scheme == "https" else 80)
    request.headers.update(propagation(trace, res, url.host, port))


class TracingTransport(httpx.AsyncBaseTransport):
    """Wraps any async transport; records each request it sends inside a traced request."""

    def __init__(
        self, transport: httpx.AsyncBaseTransport | None = None, *, mask_query: bool = True
    ) -> None:
        self.transport = transport if transport is not None else httpx.AsyncHTTPTransport()
        self.mask_query = mask_query

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        active = ACTIVE.get()
        if active is None or active[0].closed:
            return await self.transport.handle_async_request(request)
        trace = active[0]
        try:
            res = new_resource("fetch", trace, active[1])
            if res is not None:
                trace.annotate(res, "method", request.method)
                trace.annotate(res, "url", safe_url(request.url, self.mask_query))
                if self.mask_query and request.url.query:
                    trace.annotate(res, "queryDigest", query_digest(request.url.query))
                if trace.propagate_to:
                    _propagate(request, trace, res)
        except Exception as exc:
            report("httpx", exc)
            res = None
        if res is None:
            return await self.transport.handle_async_request(request)
        token = ACTIVE.set((trace, res))
        try:
            response = await self.transport.handle_async_request(request)
        except BaseException as exc:
            settle_from_exception(trace, res, _now(), exc)
            raise
        finally:
            ACTIVE.reset(token)
        trace.annotate(res, "status", response.status_code)
        if isinstance(response.stream, httpx.ByteStream):
            # The body is already in memory (MockTransport, a cached response): done now.
            trace.annotate(res, "responseBytes", len(response.content))
            trace.settle(res, _now(), "ok")
        else:
            response.stream = _TracedBody(response.stream, trace, res)
        return response

    async def aclose(self) -> None:
        await self.transport.aclose()


def _wrap(transport: httpx.AsyncBaseTransport | None) -> httpx.AsyncBaseTransport | None:
    if transport is None or isinstance(transport, TracingTransport):
        return transport
    return TracingTransport(transport)


class HttpxInstrumentation(Instrumentation):
    """The global switch: wraps the transports of every ``AsyncClient`` made after install."""

    name = "httpx"
    library = "httpx"
    supported = (0, 27)

    def _install(self, module: ModuleType) -> None:
        client_class = module.AsyncClient
        original_init = client_class.__init__

        def __init__(self: httpx.AsyncClient, *args: Any, **kwargs: Any) -> None:
            original_init(self, *args, **kwargs)
            try:
                self._transport = _wrap(self._transport) or self._transport
                self._mounts = {
                    pattern: t
                    if t is None or isinstance(t, TracingTransport)
                    else TracingTransport(t)
                    for pattern, t in self._mounts.items()
                }
            except Exception as exc:
                report("httpx", exc)

        self.patches.replace(client_class, "__init__", __init__)


instrumentation = HttpxInstrumentation()
