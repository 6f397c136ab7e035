"""Two traces of a request side by side: what the slower one spent its extra time on.

    asgi-asynctrace compare server.log --route 'GET /items'   # its slowest against a typical one
    asgi-asynctrace compare slow.json fast.json

A route's slow trace reads much like its fast ones until it is set against one: the same
queries, the same fetches, only some of them longer, or more of them. ``compare`` takes two
analyses and says where the difference went: their critical paths by what held them up (as
``routes`` sums them), their operations by what they were (type and label: a query's
statement, a fetch's URL), how many and for how long, the largest differences first, and the
findings one has and the other has not. The store's routes and a viewer page of several
traces carry each route's comparison too (``typical_and_slowest``). Exports: Comparison,
Difference, compare, compare_inputs, choose_pair, typical_and_slowest.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ._analysis import Analysis
from ._load import TraceFormatError
from ._model import Trace
from ._routes import RouteInput, held_up_by, route_input
from ._select import route_key

__all__ = [
    "Comparison",
    "Difference",
    "choose_pair",
    "compare",
    "compare_inputs",
    "typical_and_slowest",
]


@dataclass(frozen=True)
class Difference:
    """One row: ``what`` in the faster trace (``count``, ``ns``) and in the slower one."""

    what: str
    count: tuple[int, int]
    ns: tuple[int, int]

    @property
    def delta(self) -> int:
        return self.ns[1] - self.ns[0]

    def to_dict(self) -> dict[str, Any]:
        return {"what": self.what, "count": list(self.count), "ns": list(self.ns),
                "deltaNs": self.delta}  # fmt: skip


@dataclass(frozen=True)
class Comparison:
    faster: Analysis
    slower: Analysis
    baseline: str  # what the faster one is: "faster", or "typical" (the route's median)
    route: str | None  # "GET /orders/{order_id}" when both are of that route
    held: list[Difference] = field(default_factory=list)  # critical path, by what held it
    operations: list[Difference] = field(default_factory=list)  # by type and label
    only_slower: list[str] = field(default_factory=list)  # finding kinds
    only_faster: list[str] = field(default_factory=list)

    @property
    def delta(self) -> int:
        return self.slower.duration - self.faster.duration

    def to_dict(self) -> dict[str, Any]:
        def side(a: Analysis) -> dict[str, Any]:
            return {"traceId": a.trace_id, "request": a.request, "durationNs": a.duration}

        return {
            "route": self.route,
            "slower": side(self.slower),
            "baseline": {**side(self.faster), "is": self.baseline},
            "deltaNs": self.delta,
            "heldUpBy": [d.to_dict() for d in self.held],
            "operations": [d.to_dict() for d in self.operations],
            "findings": {"onlySlower": self.only_slower, "onlyFaster": self.only_faster},
        }


def _rows(faster: Counter[str], slower: Counter[str], counts: tuple[Counter[str], ...] = (),
          ) -> list[Difference]:  # fmt: skip
    """Every key of either, the largest difference in time first (then the larger count)."""
    out = []
    for key in set(faster) | set(slower):
        count = (counts[0][key], counts[1][key]) if counts else (0, 0)
        out.append(Difference(key, count, (faster[key], slower[key])))
    return sorted(out, key=lambda d: (-abs(d.delta), -abs(d.count[1] - d.count[0]), d.what))


# In what names a thing by its key or address (a cache key, a URL, a queue's routing key), the
# ids that differ from one request to the next, each a whole part of it: hex of 8 or more with
# a digit in it (a UUID too), or a number (``v1`` in ``/api/v1/`` is not one).
_IDS = re.compile(
    r"(?<![A-Za-z0-9])(?:(?=[0-9a-f-]*[0-9])[0-9a-f][0-9a-f-]{7,}|\d+)(?![A-Za-z0-9])"
)
_KEYED = ("cache-", "kv-", "queue-")


def _operation(type: str, label: str) -> str:
    """An operation's row: its type and label, with the ids in a key or a URL's path as
    ``{id}``, so that ``cache-get user:41`` and ``cache-get user:42`` are one operation."""
    if type == "fetch":  # "GET http://host:port/path?query": only the path has ids
        method, _, url = label.partition(" ")
        at = url.find("/", url.find("//") + 2) if "//" in url else url.find("/")
        if at >= 0:
            label = f"{method} {url[:at]}{_IDS.sub('{id}', url[at:])}"
    elif type.startswith(_KEYED):
        label = _IDS.sub("{id}", label)
    return f"{type} {label}" if label != type else type


def _operations(a: Analysis) -> tuple[Counter[str], Counter[str]]:
    """Each operation's time alive (running and waiting) and count, by type and label."""
    ns: Counter[str] = Counter()
    count: Counter[str] = Counter()
    for t in a.times.values():
        if t.type == "root":
            continue
        what = _operation(t.type, t.label)
        ns[what] += t.sync + t.wait
        count[what] += 1
    return ns, count


def compare(faster: tuple[Analysis, Trace], slower: tuple[Analysis, Trace],
            baseline: str = "faster") -> Comparison:  # fmt: skip
    """The two side by side (each an analysis and the trace it was made of)."""
    return compare_inputs(route_input(faster[1], faster[0]), route_input(slower[1], slower[0]),
                          baseline)  # fmt: skip


def compare_inputs(faster: RouteInput, slower: RouteInput, baseline: str = "faster") -> Comparison:
    """``compare``, from what ``routes`` keeps of each trace (``route_input``)."""
    (fa, f_notes, f_steps), (sa, s_notes, s_steps) = faster, slower
    f_ops, f_count = _operations(fa)
    s_ops, s_count = _operations(sa)
    # what one did more often (a query on a cache miss, a retry) first, then what both did as
    # often and one took longer over
    rows = _rows(f_ops, s_ops, (f_count, s_count))
    ops = [d for d in rows if d.count[0] != d.count[1]]
    ops += [d for d in rows if d.count[0] == d.count[1] and d.delta]
    held = _rows(held_up_by(fa, f_steps), held_up_by(sa, s_steps))
    f_kinds = {f.kind for f in fa.findings}
    s_kinds = {f.kind for f in sa.findings}
    f_route = route_key(fa.request, f_notes)
    same = f_route == route_key(sa.request, s_notes)
    return Comparison(
        fa, sa, baseline, " ".join(f_route) if same else None, held, ops,
        [f.kind for f in sa.findings if f.kind not in f_kinds],
        [f.kind for f in fa.findings if f.kind not in s_kinds],
    )  # fmt: skip


T = TypeVar("T")


def _pair(items: Sequence[T], duration: Callable[[T], int]) -> tuple[T, T, str]:
    """(faster, slower, what the faster is) of two or more: two as they are; more, the
    slowest against the median (the typical one; of an even count, the lower of the middle
    two)."""
    ordered = sorted(items, key=duration)
    if len(ordered) == 2:
        return ordered[0], ordered[1], "faster"
    return ordered[(len(ordered) - 1) // 2], ordered[-1], "typical"


def typical_and_slowest(inputs: Sequence[RouteInput]) -> Comparison | None:
    """A route's slowest trace against its typical one (as ``choose_pair`` takes them), from
    what ``routes`` keeps of each; None for fewer than two."""
    if len(inputs) < 2:
        return None
    return compare_inputs(*_pair(inputs, lambda i: i[0].duration))


def choose_pair(traces: Sequence[Trace]) -> tuple[Trace, Trace, str]:
    """(faster, slower, what the faster is): two traces as they are; more, of one route, its
    slowest against its median. A TraceFormatError says what to narrow when that cannot be
    done."""
    if len(traces) < 2:
        raise TraceFormatError(
            f"compare needs two traces, or several of one route; got {len(traces)}"
        )
    routes = Counter(route_key(t.request, t.annotations_of(t.root.async_id)) for t in traces)
    if len(traces) > 2 and len(routes) > 1:
        named = ", ".join(f"{m} {r} ({n})" for (m, r), n in routes.most_common(5))
        more = ", …" if len(routes) > 5 else ""
        raise TraceFormatError(
            f"{len(traces)} traces of {len(routes)} routes ({named}{more}): "
            "narrow them to one route with --route, or to two traces with --id"
        )
    return _pair(traces, lambda t: t.duration_ns)
