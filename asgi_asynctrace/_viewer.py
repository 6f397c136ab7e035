"""The viewer as one self-contained HTML page: the trace inside, no network, works from file://.

    html = viewer_html([trace])                     # bytes; the CLI: convert --to html
    write_viewer("trace.html", [trace])
    page = viewer_html(store_url="/__asynctrace/")  # what the middleware serves

The page's code lives in ``viewer/`` as separate modules (``js/load.js``, ``js/bubbles.js``, ...)
and is inlined here in order. Trace data goes in a ``<script type="application/json">`` block
with ``<``, ``>`` and ``&`` escaped, so nothing in a trace can close it or become markup; the
page itself only ever puts trace strings into the DOM as text. Each embedded trace carries the
analyzer's result (critical path, findings); several traces, their routes table too (as
``asgi-asynctrace routes`` and the store's ``GET routes`` give it). Exports: viewer_html,
write_viewer.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import Any

import orjson

from ._analysis import Analysis, analyze
from ._load import load_trace
from ._model import Trace
from ._routes import route_input, routes_with_comparisons

__all__ = ["viewer_html", "write_viewer"]

_SCRIPTS = ("util.js", "load.js", "bubbles.js", "timeline.js", "tree.js", "app.js")


def _read(name: str) -> str:
    return (resources.files("asgi_asynctrace") / "viewer" / name).read_text(encoding="utf-8")


def _json_block(element_id: str, value: Any) -> str:
    data = orjson.dumps(value)
    data = data.replace(b"<", b"\\u003c").replace(b">", b"\\u003e").replace(b"&", b"\\u0026")
    return f'<script type="application/json" id="{element_id}">{data.decode()}</script>'


def with_analysis(trace: Trace, analysis: Analysis | None = None) -> dict[str, Any]:
    """What the viewer loads: the trace in format v1 and the analyzer's view of it (``analysis``
    when the caller has it already)."""
    return {"trace": trace.to_dict(), "analysis": (analysis or analyze(trace)).to_dict()}


@cache
def _shell() -> str:
    page = _read("index.html")
    script = "\n".join(_read(f"js/{name}") for name in _SCRIPTS)
    if "</script" in script.lower():  # would end the inline script early
        raise RuntimeError("viewer code must not contain '</script'")
    demo = with_analysis(load_trace(_read("demo.json")))
    page = page.replace("/*STYLE*/", _read("viewer.css"))
    page = page.replace("/*SCRIPT*/", script)
    return page.replace("<!--DATA-->", _json_block("asynctrace-demo", demo) + "\n<!--DATA-->")


def viewer_html(traces: Sequence[Trace] = (), *, store_url: str | None = None) -> bytes:
    """The viewer page with ``traces`` inside (the first one shown), or listing the app's
    trace store at ``store_url`` when served by the middleware."""
    page = _shell()
    analysed = [(t, analyze(t)) for t in traces]
    data: dict[str, Any] = {"traces": [with_analysis(t, a) for t, a in analysed]}
    if len(analysed) > 1:  # several: the routes table too, as the served viewer has it
        data["routes"] = routes_with_comparisons([route_input(t, a) for t, a in analysed])
    block = _json_block("asynctrace-data", data)
    page = page.replace("<!--DATA-->", block)
    if store_url is not None:
        meta = f'<meta name="asynctrace-store" content="{html.escape(store_url, quote=True)}">'
        page = page.replace("<title>", meta + "\n<title>", 1)
    return page.encode()


def write_viewer(path: str | os.PathLike[str], traces: Sequence[Trace]) -> None:
    """Write the self-contained viewer page holding ``traces`` to ``path``."""
    with open(path, "wb") as file:
        file.write(viewer_html(traces))
