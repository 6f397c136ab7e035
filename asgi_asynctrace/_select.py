"""Which traces of a log a command reads: by id, by route, by when, the slowest, the slow ones.

    asgi-asynctrace routes server.log                       # GET /orders/{order_id} is slow…
    asgi-asynctrace summary server.log --route 'GET /orders/{order_id}' --slowest 1
    asgi-asynctrace view server.log --id 5ce0347d           # …and here is its slowest trace

Every command that reads traces takes the same options; they narrow what it reads, in the
order the files give them (``--slowest``: the longest first). Exports: Selection,
add_selection, route_key.
"""

from __future__ import annotations

import argparse
import heapq
import shlex
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ._load import TraceFormatError
from ._model import Trace

__all__ = ["Selection", "add_selection", "route_key"]


def route_key(request: Mapping[str, Any], notes: Mapping[str, Any]) -> tuple[str, str]:
    """(method, route): the route's template where the root was annotated with one (the
    middleware does, where the router matched parameters), else the request's path."""
    route = notes.get("route")
    path = route if isinstance(route, str) and route else request.get("path")
    return str(request.get("method") or "?"), str(path or "?")


@dataclass(frozen=True)
class Selection:
    """What to keep: traces whose id starts with one of ``ids``, whose route is one of
    ``routes`` (``GET /orders/{order_id}``, or without the method for any; the concrete path
    matches too), that took at least ``min_ns``, that started from ``since`` up to ``until``
    (Unix nanoseconds); of those the ``slowest`` longest."""

    ids: tuple[str, ...] = ()
    routes: tuple[str, ...] = ()
    min_ns: int = 0
    slowest: int | None = None
    since: int | None = None
    until: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Selection:
        ids = tuple(i.strip().lower() for i in args.id or ())
        if any(not i for i in ids):
            raise TraceFormatError("--id wants a trace id or the start of one, got ''")
        routes = tuple(" ".join(r.split()) for r in args.route or ())
        if args.slowest is not None and args.slowest < 1:
            raise TraceFormatError(f"--slowest wants 1 or more, got {args.slowest}")
        if args.min_ms is not None and args.min_ms < 0:
            raise TraceFormatError(f"--min-ms wants 0 or more, got {args.min_ms:g}")
        min_ns = round(args.min_ms * 1e6) if args.min_ms is not None else 0
        since = _when(args.since, "--since") if args.since else None
        until = _when(args.until, "--until") if args.until else None
        return cls(ids, routes, min_ns, args.slowest, since, until)

    @property
    def narrows(self) -> bool:
        return self != Selection()  # anything asked

    def keeps(self, trace: Trace) -> bool:
        if self.ids and not str(trace.trace_id).lower().startswith(self.ids):
            return False
        if self.min_ns and trace.duration_ns < self.min_ns:
            return False
        started = trace.started_at_unix_ns
        if self.since is not None and started < self.since:
            return False
        if self.until is not None and started > self.until:
            return False
        if self.routes:
            request = trace.request
            method, route = route_key(request, trace.annotations_of(trace.root.async_id))
            names = {route, str(request.get("path") or "")}
            names |= {f"{method} {name}" for name in names}
            if not names.intersection(self.routes):
                return False
        return True

    def apply(self, traces: Iterable[tuple[str, Trace]]) -> Iterator[tuple[str, Trace]]:
        """The kept (where, trace) pairs; a TraceFormatError when the traces were there but
        none was kept, saying how many were read and what was asked."""
        if not self.narrows:
            yield from traces
            return
        read = kept = 0

        def counted() -> Iterator[tuple[str, Trace]]:
            nonlocal read
            for pair in traces:
                read += 1
                if self.keeps(pair[1]):
                    yield pair

        chosen: Iterable[tuple[str, Trace]] = counted()
        if self.slowest is not None:
            chosen = heapq.nlargest(self.slowest, chosen, key=lambda p: p[1].duration_ns)
        for pair in chosen:
            kept += 1
            yield pair
        if not kept:
            raise TraceFormatError(f"no trace matched {self.describe()} ({read} read)")

    def describe(self) -> str:
        """What was asked, as the options that asked it."""
        asked = [f"--id {i}" for i in self.ids]
        asked += [f"--route {shlex.quote(r)}" for r in self.routes]
        if self.min_ns:
            asked.append(f"--min-ms {self.min_ns / 1e6:g}")
        for name, at in (("--since", self.since), ("--until", self.until)):
            if at is not None:
                stamp = datetime.fromtimestamp(at / 1e9).astimezone().isoformat(timespec="seconds")
                asked.append(f"{name} {stamp}")
        return " ".join(asked)


_AGO = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _when(text: str, option: str) -> int:
    """Unix nanoseconds from ``30m``, ``2h``, ``1d`` (that long ago) or an ISO 8601 date and
    time (``2026-12-01T10:00``; local time unless it names its zone)."""
    text = text.strip()
    unit = _AGO.get(text[-1:])
    if unit is not None:
        try:
            ago = float(text[:-1])
        except ValueError:
            ago = -1.0
        if ago >= 0:
            return time.time_ns() - round(ago * unit * 1e9)
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise TraceFormatError(
            f"{option} wants a time (2026-12-01T10:00, local unless it names its zone) or how "
            f"long ago (30m, 2h, 1d), got {text!r}"
        ) from None
    if at.tzinfo is None:
        at = at.astimezone()  # local time, as a log's reader means it
    return round(at.timestamp() * 1e9)


def add_selection(parser: argparse.ArgumentParser) -> None:
    """The options every command that reads traces takes."""
    group = parser.add_argument_group("which traces (all, unless narrowed)")
    group.add_argument("--id", action="append", metavar="ID",
                       help="a trace's id, or its start (repeat for more)")  # fmt: skip
    group.add_argument("--route", action="append", metavar="ROUTE",
                       help="'GET /orders/{order_id}', or a route or path for any method "
                            "(repeat for more)")  # fmt: skip
    group.add_argument("--min-ms", type=float, metavar="MS",
                       help="only traces that took at least this long")  # fmt: skip
    group.add_argument("--since", metavar="WHEN",
                       help="only traces that started then or later: 2026-12-01T10:00 (local "
                            "time unless it names its zone), or 30m, 2h, 1d ago")  # fmt: skip
    group.add_argument("--until", metavar="WHEN", help="only traces that started then or before")
    group.add_argument("--slowest", type=int, metavar="N",
                       help="only the N longest of those, the longest first")  # fmt: skip
