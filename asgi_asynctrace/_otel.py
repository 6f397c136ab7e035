"""Traces as OpenTelemetry spans on the app's own TracerProvider.

    app.add_middleware(AsyncTraceMiddleware, sinks=[OtelSink()])   # the global provider
    OtelSink(tracer_provider=provider)                             # or a given one

Each finished trace becomes spans: the root a SERVER span named ``GET /items`` (by the route's
template, ``GET /orders/{order_id}``, with ``http.route``, where it has one), every other
resource a span whose parent is its trigger's span, with the resource's life as the span's
time, its annotations as ``asynctrace.*`` attributes (``asynctrace.type``,
``asynctrace.url``, ...), an event for each callback step, a ``blocked`` event with a
``code.stacktrace`` where the watchdog saw a step block the loop, and the status ERROR for a
resource that failed. When the request carried a W3C ``traceparent``, the root span is its child, so
the spans join the distributed trace the caller started. Futures are left out unless asked
for: they are what something else waited on. Needs ``opentelemetry-api`` (and an SDK to send
spans anywhere). Exports: OtelSink.
"""

from __future__ import annotations

from typing import Any

from ._failures import report
from ._model import Resource, Trace

__all__ = ["OtelSink"]


class OtelSink:
    """A sink (``sinks=[OtelSink()]``) that records every finished trace as spans."""

    needs_json = False  # reads the Trace itself

    def __init__(self, tracer_provider: Any = None, *, futures: bool = False) -> None:
        from opentelemetry import trace as otel

        self._otel = otel
        self._tracer = otel.get_tracer("asgi_asynctrace", tracer_provider=tracer_provider)
        self._futures = futures

    def __call__(self, trace: Trace, data: bytes | None, /) -> None:
        otel = self._otel
        from opentelemetry.propagate import extract
        from opentelemetry.trace import SpanKind, Status, StatusCode

        wall = trace.started_at_unix_ns - trace.origin
        end_of_trace = trace.origin + trace.duration_ns
        notes: dict[int, dict[str, Any]] = {}
        for rid, key, value in trace.annotations:
            notes.setdefault(rid, {})[key] = value
        incoming = trace.request.get("traceparent")
        parent_context = extract({"traceparent": incoming}) if isinstance(incoming, str) else None
        sampled = trace.samples_by_resource()
        spans: dict[int, Any] = {}
        for r in sorted(trace.resources, key=lambda r: r.async_id):
            if r.type == "future" and not self._futures:
                continue
            try:
                parent = spans.get(r.trigger_id)
                context = otel.set_span_in_context(parent) if parent is not None else parent_context
                root = r.async_id == trace.root.async_id
                name = _name(trace, r, notes.get(r.async_id, {}), root)
                attributes: dict[str, Any] = {"asynctrace.type": r.type,
                                              "asynctrace.async_id": r.async_id,
                              "asynctrace.state": r.state}  # fmt: skip
                if root:
                    attributes["asynctrace.trace_id"] = trace.trace_id
                    route = notes.get(r.async_id, {}).get("route")
                    if isinstance(route, str):  # OpenTelemetry's name for the template
                        attributes["http.route"] = route
                for key, value in notes.get(r.async_id, {}).items():
                    if value is not None:
                        attributes[f"asynctrace.{key}"] = value
                span = self._tracer.start_span(
                    name, context=context, kind=SpanKind.SERVER if root else SpanKind.INTERNAL,
                    attributes=attributes, start_time=wall + r.created_at,
                )  # fmt: skip
                cb = r.callbacks
                for i in range(0, len(cb), 2):
                    ended = cb[i + 1] if i + 1 < len(cb) else end_of_trace
                    span.add_event("step", {"asynctrace.duration_ns": ended - cb[i]},
                                   timestamp=wall + cb[i])  # fmt: skip
                for at, frames in sampled.get(r.async_id, ()):
                    span.add_event("blocked", {"code.stacktrace": "\n".join(frames)},
                                   timestamp=wall + at)  # fmt: skip
                if r.state == "error":
                    error = notes.get(r.async_id, {}).get("error")
                    span.set_status(Status(StatusCode.ERROR, str(error) if error else None))
                span.end(end_time=wall + _ended(r, end_of_trace))
                spans[r.async_id] = span
            except Exception as exc:
                report("sink:otel", exc)


def _name(trace: Trace, r: Resource, notes: dict[str, Any], root: bool) -> str:
    if root:  # by the route's template where there is one: a name with few values, as
        # OpenTelemetry asks of a server span's name (GET /orders/{order_id}, not each id)
        route = notes.get("route")
        method = trace.request.get("method") or ""
        path = route if isinstance(route, str) else trace.request.get("path") or ""
        return f"{method} {path}".strip() or "request"
    from ._analysis import creation_stack, label

    return f"{r.type} {label(r, notes, creation_stack(trace, r))}"[:120]


def _ended(r: Resource, end_of_trace: int) -> int:
    if r.settled_at is not None:
        return max(r.settled_at, r.created_at)
    return max(end_of_trace, r.created_at)
