"""Regenerate the sample traces from the sample app, so they are what the code really records.

    python -m sample_app.generate        # sample_app/traces/*.json, all.pftrace, all.html

The JSON traces are committed; all.pftrace and all.html are written for you to open (and are
not committed: the page would be a second copy of the viewer's sources).

Runs every route of the sample app in-process on embedded defaults, once untraced and then
with ``X-Async-Trace: 1`` (in a process that has served each route before, as a server that
has been up a while: no first-use imports, the schema made, the heap frozen), writes each
trace as ``<route>.json``, all of them as one Perfetto trace and one viewer page, and
refreshes the viewer's built-in demo (the /items trace). tests/test_sample_app.py checks
that the committed traces carry only the planted problems.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import tempfile
from pathlib import Path

import httpx

from asgi_asynctrace import Trace, capture_traces
from asgi_asynctrace._perfetto import to_perfetto
from asgi_asynctrace._viewer import write_viewer

OUT = Path(__file__).resolve().parent / "traces"
DEMO = Path(__file__).resolve().parent.parent / "asgi_asynctrace" / "viewer" / "demo.json"
SKIP = {"/chat"}  # a page, not a pattern: the websocket itself is /ws


async def _collect() -> list[tuple[str, Trace]]:
    from sample_app import patterns
    from sample_app.app import ROUTES, app

    out: list[tuple[str, Trace]] = []
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://sample") as client:
        # Each route once untraced first: a process's first request to a route pays for
        # imports its libraries make on first use and for the schema, which a sample should
        # not show as the route's own pattern. Then the cache is emptied, so that /items
        # shows its miss (the query, the put) rather than a hit.
        for path in ROUTES:
            if path not in SKIP:
                (await client.get(path)).raise_for_status()
        await patterns.cache.clear()
        # As the analyzer advises an app once it has started: what is loaded by now stays out
        # of every collection, so that no sample is a full collection of the imports' heap
        # that happened to fall in its request (one /parallel sample was: 68 ms).
        gc.collect()
        gc.freeze()
        for path in ROUTES:
            if path in SKIP:
                continue
            with capture_traces() as traces:
                response = await client.get(path, headers={"X-Async-Trace": "1"})
            response.raise_for_status()
            out.append((path, traces[0]))
    return out


def main() -> None:
    logging.getLogger("asgi_asynctrace.trace").setLevel(logging.WARNING)  # no log lines here
    scratch = tempfile.mkdtemp(prefix="asynctrace-sample-")
    os.environ.setdefault("SAMPLE_DB", os.path.join(scratch, "sample.db"))
    try:
        collected = asyncio.run(_collect())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    OUT.mkdir(exist_ok=True)
    for path, trace in collected:
        name = path.strip("/").replace("/", "-") or "index"
        (OUT / f"{name}.json").write_bytes(trace.to_json())
    traces = [trace for _, trace in collected]
    (OUT / "all.pftrace").write_bytes(to_perfetto(*traces))
    write_viewer(OUT / "all.html", traces)
    DEMO.write_bytes(dict(collected)["/items"].to_json())
    print(f"wrote {len(collected)} traces to {OUT} and the viewer's demo")


if __name__ == "__main__":
    main()
