"""Failures inside the tracer: caught at the boundary, counted, logged once per place.

    try:
        sink(trace)
    except Exception as exc:
        report("sink:log", exc)

The app never sees them. ``failure_counts()`` says how often each place failed.
Exports: report, failure_counts, reset_failures.
"""

from __future__ import annotations

import logging
import threading

__all__ = ["failure_counts", "report", "reset_failures"]

logger = logging.getLogger("asgi_asynctrace")

_counts: dict[str, int] = {}
_lock = threading.Lock()


def report(where: str, exc: BaseException) -> None:
    """Count a failure at ``where``; log it with its traceback the first time only."""
    try:
        with _lock:
            first = where not in _counts
            _counts[where] = _counts.get(where, 0) + 1
        if first:
            logger.warning(
                "asgi-asynctrace: %s failed (%s: %s); the app is unaffected, later failures "
                "here are only counted",
                where,
                type(exc).__name__,
                exc,
                exc_info=exc,
            )
    except Exception:
        pass


def failure_counts() -> dict[str, int]:
    """How many times each place inside the tracer failed since the process started."""
    with _lock:
        return dict(_counts)


def reset_failures() -> None:
    """Forget the counts (and log the next failure of each place again); for tests."""
    with _lock:
        _counts.clear()
