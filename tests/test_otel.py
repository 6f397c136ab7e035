"""OpenTelemetry spans from traces, checked with the SDK's in-memory exporter."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_asynctrace import AsyncTraceMiddleware, OtelSink, Trace, start_resource
from tests.helpers import call

PARENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{PARENT_TRACE}-00f067aa0ba902b7-01"


async def child() -> None:
    await asyncio.sleep(0.002)


async def endpoint(request: Request) -> Response:
    await asyncio.gather(child(), child())
    try:
        with start_resource("db-query", statement="select 1"):
            raise LookupError("no row")
    except LookupError:
        pass
    return PlainTextResponse("ok")


def spans_of(headers: dict[str, str]) -> tuple[list[Any], Any]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = AsyncTraceMiddleware(Starlette(routes=[Route("/orders", endpoint)]), log_traces=False,
                               sinks=[OtelSink(tracer_provider=provider)])  # fmt: skip

    async def get(client: Any) -> Any:
        return await client.get("/orders", headers={"X-Async-Trace": "1", **headers})

    response = call(app, get)
    return list(exporter.get_finished_spans()), response


def test_each_resource_is_a_span_under_its_trigger_with_steps_and_attributes() -> None:
    spans, response = spans_of({})
    by_name = {s.name: s for s in spans}
    root = by_name["GET /orders"]
    assert root.kind == SpanKind.SERVER and root.parent is None
    assert root.attributes["asynctrace.trace_id"] == response.headers["x-async-trace-id"]
    tasks = [s for s in spans if s.attributes["asynctrace.type"] == "task"]
    assert len(tasks) == 2 and all(t.parent.span_id == root.context.span_id for t in tasks)
    timers = [s for s in spans if s.attributes["asynctrace.type"] == "timer"]
    assert {t.parent.span_id for t in timers} == {t.context.span_id for t in tasks}
    assert all(t.attributes["asynctrace.kind"] == "sleep" for t in timers)
    assert all(len(t.events) >= 2 and t.events[0].name == "step" for t in tasks)
    assert all(s.start_time <= s.end_time for s in spans)
    assert all(root.start_time <= s.start_time for s in spans)
    query = by_name["db-query select 1"]
    assert query.status.status_code == StatusCode.ERROR
    assert query.attributes["asynctrace.error"] == "LookupError"
    assert not any(s.attributes["asynctrace.type"] == "future" for s in spans)
    assert len({s.context.trace_id for s in spans}) == 1


def test_an_incoming_traceparent_makes_the_root_span_its_child() -> None:
    spans, _ = spans_of({"traceparent": TRACEPARENT})
    root = next(s for s in spans if s.name == "GET /orders")
    assert f"{root.context.trace_id:032x}" == PARENT_TRACE
    assert root.parent is not None and f"{root.parent.span_id:016x}" == "00f067aa0ba902b7"
    assert {f"{s.context.trace_id:032x}" for s in spans} == {PARENT_TRACE}
    spans, _ = spans_of({"traceparent": "garbage"})
    assert next(s for s in spans if s.name == "GET /orders").parent is None


def test_a_step_that_blocked_the_loop_gets_a_blocked_event_with_its_stack() -> None:
    async def blocks(request: Request) -> Response:
        await asyncio.sleep(0)
        time.sleep(0.15)  # the line the event's stack starts at
        return PlainTextResponse("ok")

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    traces: list[Trace] = []
    app = AsyncTraceMiddleware(Starlette(routes=[Route("/block", blocks)]), log_traces=False,
                               sinks=[OtelSink(tracer_provider=provider),
                                      lambda t, d: traces.append(t)])  # fmt: skip
    call(app, lambda c: c.get("/block", headers={"X-Async-Trace": "1"}))
    (trace,) = traces
    assert trace.samples
    (root,) = [s for s in exporter.get_finished_spans() if s.name == "GET /block"]
    blocked = [e for e in root.events if e.name == "blocked"]
    assert len(blocked) == len(trace.samples)
    wall = trace.started_at_unix_ns - trace.origin
    for event, (_, at, frames) in zip(blocked, trace.samples, strict=True):
        assert event.attributes is not None
        assert event.attributes["code.stacktrace"] == "\n".join(frames)
        assert "blocks @ tests/test_otel.py:" in frames[0]
        assert event.timestamp == wall + at


def test_the_root_span_is_named_by_its_route_with_http_route() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    routes = [Route("/orders/{order_id:int}", endpoint), Route("/orders", endpoint)]
    app = AsyncTraceMiddleware(Starlette(routes=routes), log_traces=False,
                               sinks=[OtelSink(tracer_provider=provider)])  # fmt: skip

    async def get(client: Any) -> Any:
        await client.get("/orders/42", headers={"X-Async-Trace": "1"})
        return await client.get("/orders", headers={"X-Async-Trace": "1"})

    call(app, get)
    roots = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert [(s.name, (s.attributes or {}).get("http.route")) for s in roots] == [
        ("GET /orders/{order_id}", "/orders/{order_id}"),
        ("GET /orders", None),  # the path is the route: no template was recorded
    ]
    assert (roots[0].attributes or {})["asynctrace.path"] == "/orders/42"  # the path stays
