"""Turning library instrumentation on and off by name.

    instrument()                 # every instrumentation whose library is installed
    instrument("httpx")          # just that one
    uninstrument()

The modules live in ``asgi_asynctrace.instrumentation``; they are imported here only when
asked for, so importing the tracer never imports an instrumented library.
Exports: instrument, uninstrument.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

__all__ = ["instrument", "uninstrument"]

_PACKAGE = "asgi_asynctrace.instrumentation"
logger = logging.getLogger("asgi_asynctrace")


def _available() -> list[str]:
    names: list[str] = importlib.import_module(_PACKAGE).available()
    return names


def _instrumentation(name: str) -> Any | None:
    if name not in _available():
        raise ValueError(f"no instrumentation {name!r}; available: {', '.join(_available())}")
    try:
        return importlib.import_module(f"{_PACKAGE}.{name}").instrumentation
    except ImportError as exc:
        logger.info("asgi-asynctrace: %s instrumentation skipped (%s)", name, exc)
        return None


def instrument(*names: str) -> dict[str, bool]:
    """Install the named instrumentations (all available when none is named).

    Returns which ones are now on; a library that is missing or too old is skipped with one
    log line, never an exception. An unknown name is a ValueError.
    """
    result = {}
    for name in names or _available():
        module = _instrumentation(name)
        result[name] = module is not None and bool(module.install())
    return result


def uninstrument(*names: str) -> None:
    """Undo ``instrument()`` for the named instrumentations (all when none is named)."""
    for name in names or _available():
        module = _instrumentation(name)
        if module is not None:
            module.uninstall()
