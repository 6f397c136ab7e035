"""Many traces at once, by route: which routes were slow, and what held them up.

    asgi-asynctrace extract server.log | asgi-asynctrace routes -

A route is the method and the path as its route's template (the root's ``route``
annotation, ``/orders/{order_id}``), or the path itself where the router matched no parameter
(or the trace came from an app or a version that did not record it). For each route: how many
traces, their durations (median, 95th percentile, longest), what held them up (each trace's
critical path, its time given to what the request waited on there: the operation it waited
on, not the task or future that carried it; its own code; the rest of the request, which the
path does not cover), which findings came up in how many of its traces, and its slowest
trace, to open (``_report.format_routes`` prints them). Exports: RouteStats, RouteInput,
by_route, routes_with_comparisons, route_input, held_up_by, own_steps, OWN_CODE, REST, AFTER.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._analysis import Analysis, PathStep
from ._findings import SEVERITIES
from ._model import Trace
from ._select import route_key

__all__ = [
    "AFTER",
    "OWN_CODE",
    "REST",
    "RouteInput",
    "RouteStats",
    "by_route",
    "held_up_by",
    "own_steps",
    "route_input",
    "routes_with_comparisons",
]

# What carries an operation rather than being one: on the critical path, a task's time goes to
# what it waited on inside it (a fetch, a query, a sleep) when there is one.
_CARRIERS = frozenset(("task", "future"))
OWN_CODE = "own code"
REST = "the rest"
AFTER = "after the response"  # a BackgroundTask, cleanup: no client waited for it


@dataclass
class RouteStats:
    method: str
    route: str
    durations: list[int] = field(default_factory=list)
    held: Counter[str] = field(default_factory=Counter)  # ns of critical path, by what held it
    findings: Counter[str] = field(default_factory=Counter)  # kind -> traces with it
    worst: dict[str, str] = field(default_factory=dict)  # kind -> its worst severity
    slowest: tuple[int, str] = (-1, "")  # duration, trace id

    @property
    def count(self) -> int:
        return len(self.durations)

    def percentile(self, p: float) -> int:
        """Nearest rank: the smallest duration at or above ``p`` percent of the traces."""
        ordered = sorted(self.durations)
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    def to_dict(self) -> dict[str, Any]:
        total = sum(self.held.values()) or 1
        found = self.findings.most_common()
        return {
            "method": self.method,
            "route": self.route,
            "traces": self.count,
            "p50Ns": self.percentile(50),
            "p95Ns": self.percentile(95),
            "maxNs": max(self.durations),
            "heldUpBy": {k: round(v / total, 4) for k, v in self.held.most_common()},
            "findings": {k: {"traces": n, "worst": self.worst[k]} for k, n in found},
            "slowestTraceId": self.slowest[1],
        }


def _covered(spans: Iterable[tuple[int, int]]) -> int:
    total, end = 0, -1
    for start, stop in sorted(spans):
        start = max(start, end)
        if stop > start:
            total += stop - start
            end = stop
    return total


def held_up_by(a: Analysis, own_steps: Sequence[tuple[int, int]] = ()) -> Counter[str]:
    """A request's duration by what held it up, from its critical path: each top-level step's
    time goes to its type, or, for a task or future with something else inside (a fetch, a
    query, a cache call, a timer), to the outermost such steps for as long as they ran, and
    the rest of it to the carrier; the request's own stretches to ``own code``, and so what the
    path does not cover while one of the root's steps ran (``own_steps``: its callbacks, from
    the request's start; the short stretches between one query and the next, say); the rest
    of what the path does not cover to ``the rest`` (the loop's turns, other work); what ran
    after the response had gone out, where the path ends, to ``after the response``."""
    held: Counter[str] = Counter()
    path: Sequence[PathStep] = a.critical_path
    i = 0
    while i < len(path):
        top = path[i]
        j = i + 1
        while j < len(path) and path[j].depth > top.depth:
            j += 1
        length = max(0, top.end - top.start)
        if top.type == "root":
            held[OWN_CODE] += length
        elif top.type not in _CARRIERS:
            held[top.type] += length
        else:
            ops = [s for s in path[i + 1 : j] if s.type not in _CARRIERS and s.type != "root"]
            given = 0
            if ops:
                depth = min(s.depth for s in ops)
                outer = [s for s in ops if s.depth == depth]
                spans = [(max(s.start, top.start), min(s.end, top.end)) for s in outer]
                by_type: Counter[str] = Counter()
                for (start, stop), s in zip(spans, outer, strict=True):
                    by_type[s.type] += max(0, stop - start)
                # parallel operations share the time they overlapped
                given = min(length, _covered(spans))
                scale = given / (sum(by_type.values()) or 1)
                for kind, ns in by_type.items():
                    held[kind] += round(ns * scale)
            held[top.type] += length - given
        i = j
    tops = [(s.start, s.end) for s in path if s.depth == 0]
    on_path = _covered(tops)
    # up to when the response had gone out, as the path; what came after held no client up
    end = a.answered if 0 <= a.answered < a.duration else a.duration
    uncovered = max(0, end - on_path)
    # the root's steps outside the path's top-level steps: its own code too
    steps = [(start, min(stop, end)) for start, stop in own_steps if start < end]
    own = min(uncovered, max(0, _covered([*steps, *tops]) - on_path))
    held[OWN_CODE] += own
    held[REST] += uncovered - own
    held[AFTER] += a.duration - end
    return +held  # without what came to nothing


def own_steps(trace: Trace) -> list[tuple[int, int]]:
    """The root's steps (its callbacks) from the request's start; one still running when the
    trace was taken ends with the request."""
    cb, origin = trace.root.callbacks, trace.origin
    end = origin + trace.duration_ns
    return [(cb[i] - origin, (cb[i + 1] if i + 1 < len(cb) else end) - origin)
            for i in range(0, len(cb), 2)]  # fmt: skip


RouteInput = tuple[Analysis, dict[str, Any], Sequence[tuple[int, int]]]


def route_input(trace: Trace, a: Analysis) -> RouteInput:
    """What ``by_route`` reads of one trace: its analysis, its root's annotations, its root's
    steps."""
    return a, trace.annotations_of(trace.root.async_id), own_steps(trace)


def routes_with_comparisons(inputs: Sequence[RouteInput]) -> list[dict[str, Any]]:
    """``by_route``'s routes as dicts, each with ``comparison``: its slowest trace against its
    typical one (None for a route of one trace). For inputs held in memory (the store's, a
    viewer page's); the command line streams a log through ``by_route`` instead."""
    from ._compare import typical_and_slowest

    groups: dict[tuple[str, str], list[RouteInput]] = {}
    for item in inputs:
        groups.setdefault(route_key(item[0].request, item[1]), []).append(item)
    out = []
    for stats in by_route(inputs):
        found = typical_and_slowest(groups[(stats.method, stats.route)])
        out.append({**stats.to_dict(), "comparison": found.to_dict() if found else None})
    return out


def by_route(inputs: Iterable[RouteInput]) -> list[RouteStats]:
    """Each route's figures, from ``route_input`` of each trace; the slowest route (by its
    95th percentile) first."""
    routes: dict[tuple[str, str], RouteStats] = {}
    for a, notes, steps in inputs:
        key = route_key(a.request, notes)
        stats = routes.get(key)
        if stats is None:
            stats = routes[key] = RouteStats(*key)
        stats.durations.append(a.duration)
        stats.held.update(held_up_by(a, steps))
        kinds: dict[str, str] = {}
        for f in a.findings:
            seen = kinds.get(f.kind)
            if seen is None or SEVERITIES.index(f.severity) > SEVERITIES.index(seen):
                kinds[f.kind] = f.severity
        for kind, severity in kinds.items():
            stats.findings[kind] += 1
            worst = stats.worst.get(kind)
            if worst is None or SEVERITIES.index(severity) > SEVERITIES.index(worst):
                stats.worst[kind] = severity
        if a.duration > stats.slowest[0]:
            stats.slowest = (a.duration, a.trace_id)
    return sorted(routes.values(), key=lambda r: (-r.percentile(95), r.method, r.route))
