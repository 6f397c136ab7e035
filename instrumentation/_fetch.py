"""What the HTTP clients' instrumentation shares: what a fetch's URL may show of its query
(every value masked, and a digest to tell two queries apart by), and the headers that carry
a trace on to the service called.

    mask_query("a=1&b=2")                   # "a=*&b=*"
    query_digest(b"a=1&b=2")                # "3f09…": the same in this process for the same query
    propagation(trace, res, "api", 443)     # {} or the two X-Async-Trace headers to send

Exports: mask_query, query_digest, propagation.
"""

from __future__ import annotations

import hashlib
import os

from asgi_asynctrace._model import Resource, Trace

__all__ = ["mask_query", "propagation", "query_digest"]

# Drawn once per process: a query's digest tells two calls with the same query apart from
# two with different ones, and nothing about what the query held.
_DIGEST_KEY = os.urandom(16)


def mask_query(query: str) -> str:
    """The query with every value replaced by ``*`` (names kept, in their order)."""
    return "&".join(p.split("=", 1)[0] + ("=*" if "=" in p else "") for p in query.split("&") if p)


def query_digest(query: bytes) -> str:
    """A short keyed hash of a URL's query, for the ``queryDigest`` annotation of a fetch
    whose query values are masked: equal within a process for equal queries, so the analyzer
    can tell a repeated read, and no use for guessing a value outside it."""
    return hashlib.blake2b(query, digest_size=8, key=_DIGEST_KEY).hexdigest()


def propagation(trace: Trace, res: Resource, host: str, port: int) -> dict[str, str]:
    """Toward a host the middleware's ``propagate_to`` allows, the headers that ask the
    service there to trace this call and name its parent (``res``); {} toward any other."""
    value = trace.propagate_to.get(f"{host}:{port}") or trace.propagate_to.get(host)
    if value is None:
        return {}
    trace.annotate(res, "propagated", True)
    return {"x-async-trace": value, "x-async-trace-parent": f"{trace.trace_id}:{res.async_id}"}
