"""Trace requests in your own tests and assert on what they did.

    from asgi_asynctrace.testing import assert_concurrent, assert_no_findings, trace_request

    async def test_items_calls_its_upstreams_together():
        trace = await trace_request(app, "GET", "/items")
        assert_concurrent(trace, "fetch")
        assert_no_findings(trace, "n-plus-one", "sequential-awaits")
        assert_at_most(trace, "db-query", 2)               # no N+1 creeping back

Also a pytest plugin (registered on install): the ``asynctrace_traces`` fixture is the list of
every trace finished during the test, whatever client made the request.
Exports: trace_request, findings, assert_no_findings, assert_concurrent, assert_at_most,
asynctrace_traces.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from ._analysis import AnalysisSettings, Finding, analyze
from ._middleware import AsyncTraceMiddleware
from ._model import Trace
from ._sinks import capture_traces

__all__ = [
    "assert_at_most",
    "assert_concurrent",
    "assert_no_findings",
    "asynctrace_traces",
    "findings",
    "trace_request",
]


async def trace_request(
    app: Any,
    method: str = "GET",
    path: str = "/",
    *,
    headers: Mapping[str, str] | None = None,
    content: bytes | str | None = None,
) -> Trace:
    """Send one traced request to ``app`` in-process (httpx's ASGI transport) and return its
    finished trace. ``app`` may or may not have ``AsyncTraceMiddleware`` already."""
    import httpx

    collected: list[Trace] = []
    wrapped = AsyncTraceMiddleware(
        app, log_traces=False, store_size=0, sinks=[lambda trace, data: collected.append(trace)]
    )
    transport = httpx.ASGITransport(app=wrapped, client=("127.0.0.1", 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        await client.request(
            method, path, headers={**(headers or {}), "x-async-trace": "1"}, content=content
        )
    if not collected:
        raise AssertionError(f"{method} {path} produced no trace")
    return collected[0]


def findings(trace: Trace, *kinds: str, settings: AnalysisSettings | None = None) -> list[Finding]:
    """The analyzer's findings for ``trace``, only of ``kinds`` when given, ranked."""
    found = analyze(trace, settings).findings
    return [f for f in found if not kinds or f.kind in kinds]


def assert_no_findings(trace: Trace, *kinds: str, settings: AnalysisSettings | None = None) -> None:
    """Fail with the analyzer's summary when the trace has findings (of ``kinds``).

    blocked-loop and loop-busy are about wall-clock time: on a busy CI machine a step can
    stretch past its 20 ms threshold without the code blocking, and a timer run 20 ms late
    without other work holding the loop. Name the kinds the test is about, or raise the
    thresholds: ``settings=AnalysisSettings(blocked_step_ms=200, loop_busy_ms=200)``.
    """
    found = findings(trace, *kinds, settings=settings)
    if found:
        from ._report import format_summary

        report = format_summary(analyze(trace, settings))
        raise AssertionError(f"{len(found)} finding(s): "
                             f"{', '.join(f.kind for f in found)}\n{report}")  # fmt: skip


def assert_concurrent(trace: Trace, type: str, count: int | None = None) -> None:
    """Every resource of ``type`` was in flight at one moment: none waited for another."""
    resources = [r for r in trace.resources if r.type == type]
    if count is not None and len(resources) != count:
        raise AssertionError(f"expected {count} {type} resource(s), the trace has {len(resources)}")
    if len(resources) < 2:
        return
    last_start = max(r.created_at for r in resources)
    ends = [(r.settled_at, r.async_id) for r in resources]
    early = [rid for end, rid in ends if end is not None and end <= last_start]
    if early:
        raise AssertionError(
            f"{type} {early} ended before the last {type} started: they ran one after another"
        )


def assert_at_most(trace: Trace, type: str, most: int) -> None:
    """The request made at most ``most`` resources of ``type`` (``"db-query"``, ``"fetch"``,
    ``"cache-get"``...): a guard against an N+1 creeping back. Fails with what it made, by
    label, the most repeated first."""
    from collections import Counter

    from ._analysis import label

    made = [r for r in trace.resources if r.type == type]
    if len(made) <= most:
        return
    labels = Counter(label(r, trace.annotations_of(r.async_id)) for r in made)
    listed = "\n".join(f"  {n} x {what}" for what, n in labels.most_common(10))
    more = f"\n  … and {len(labels) - 10} more" if len(labels) > 10 else ""
    request = f"{trace.request.get('method') or ''} {trace.request.get('path') or ''}".strip()
    raise AssertionError(
        f"{request or 'the request'} made {len(made)} {type}, at most {most} allowed:\n"
        f"{listed}{more}"
    )


@pytest.fixture
def asynctrace_traces() -> Iterator[list[Trace]]:
    """Every trace finished during the test, from any AsyncTraceMiddleware in the process."""
    with capture_traces() as traces:
        yield traces
