"""The tools a user would pick instead of the tracer, set up as their docs say, for the
benchmarks to run the same requests under:

    app, on, off = otel_middleware(bare)  # OpenTelemetry ASGI + httpx, SDK, in-memory export
    profiled = wrap_per_request(bare, pyinstrument_recipe())
    vized = wrap_per_request(bare, viztracer_recipe(scratch_dir))
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from .harness import ASGIApp


def wrap_per_request(app: ASGIApp, around: Callable[[], Any]) -> ASGIApp:
    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await app(scope, receive, send)
        with around():
            await app(scope, receive, send)

    return wrapped


def pyinstrument_recipe() -> Any:
    import contextlib

    from pyinstrument import Profiler

    @contextlib.contextmanager
    def profile() -> Any:
        profiler = Profiler(async_mode="enabled")
        profiler.start()
        try:
            yield
        finally:
            profiler.stop()
            profiler.output_text()  # the recipe renders each profile: part of its cost

    return profile


def viztracer_recipe(scratch: str) -> Any:
    import contextlib

    from viztracer import VizTracer

    # One tracer for every request: each VizTracer takes a thread-specific storage key it
    # never gives back, and the process has 1,024 (the latency table's requests ran out).
    tracer = VizTracer(log_async=True, verbose=0)

    @contextlib.contextmanager
    def trace() -> Any:
        tracer.start()
        try:
            yield
        finally:
            tracer.stop()
            tracer.save(os.path.join(scratch, "viz.json"))

    return trace


def otel_middleware(bare: ASGIApp) -> tuple[ASGIApp, Callable[[], None], Callable[[], None]]:
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    app = OpenTelemetryMiddleware(bare, tracer_provider=provider)
    from sample_app import patterns

    def on() -> None:
        HTTPXClientInstrumentor.instrument_client(patterns.pricing, tracer_provider=provider)

    def off() -> None:
        HTTPXClientInstrumentor.uninstrument_client(patterns.pricing)
        exporter.clear()

    return app, on, off
