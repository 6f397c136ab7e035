"""Per-request async tracing for ASGI apps.

    app.add_middleware(AsyncTraceMiddleware)
    # curl -H 'X-Async-Trace: 1' http://127.0.0.1:8000/items
    # stderr: AsyncTrace completed; toJson() = {"version":1,...}

Everything public is exported here; every other module is private.
"""

from __future__ import annotations

import os as _os
import sys as _sys

if _os.environ.get("ASYNCTRACE_PURE_PYTHON"):  # run without the C accelerator (tests, debugging)
    _sys.modules.setdefault(__name__ + "._speedups", None)  # type: ignore[arg-type]

from ._analysis import Analysis, AnalysisSettings, Finding, analyze
from ._context import ResourceScope, annotate, current_resource, current_trace, start_resource
from ._failures import failure_counts, reset_failures
from ._hooks import install_hooks, uninstall_hooks
from ._instrument import instrument, uninstrument
from ._join import join_traces
from ._load import TraceFormatError, load_trace
from ._middleware import AsyncTraceMiddleware
from ._model import (
    RESOURCE_TYPES,
    STATES,
    AnnotationValue,
    FrameOrigin,
    Resource,
    Trace,
    TraceLimits,
    frame_origin,
)
from ._otel import OtelSink
from ._perfetto import PerfettoSink
from ._sinks import (
    LOG_PREFIX,
    LogSink,
    TraceSink,
    TraceStore,
    capture_traces,
    decode_trace_header,
)

__version__ = "0.1.0"

__all__ = [
    "LOG_PREFIX",
    "RESOURCE_TYPES",
    "STATES",
    "Analysis",
    "AnalysisSettings",
    "AnnotationValue",
    "AsyncTraceMiddleware",
    "Finding",
    "FrameOrigin",
    "LogSink",
    "OtelSink",
    "PerfettoSink",
    "Resource",
    "ResourceScope",
    "Trace",
    "TraceFormatError",
    "TraceLimits",
    "TraceSink",
    "TraceStore",
    "analyze",
    "annotate",
    "capture_traces",
    "current_resource",
    "current_trace",
    "decode_trace_header",
    "failure_counts",
    "frame_origin",
    "install_hooks",
    "instrument",
    "join_traces",
    "load_trace",
    "reset_failures",
    "start_resource",
    "uninstall_hooks",
    "uninstrument",
]
