"""Who held the loop while a request waited for it: the steps of the process's other traced
requests that ran in a ``loop-busy`` finding's windows.

    analysis = name_blockers(analyze(trace), trace, store.own_traces())
    for b in analysis.findings[0].blockers:     # the longest cover first
        print(b.request, b.label, b.ran_ns, b.site, b.trace_id)

Only traces of the same process may be set beside each other (one process, one loop): the
store's own, never those of a directory shared by several workers, nor a log of many. Times
are compared on the wall clock each trace started at, plus its monotonic offsets.
Exports: name_blockers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from ._analysis import Analysis, creation_stack, label
from ._findings import LOOP_TYPES, MS, Blocker, site_of
from ._model import Trace

__all__ = ["name_blockers"]

# A step is named when it ran through at least this much of the wait, and at most this many
# are named (the longest covers first).
MIN_COVER_NS = 1 * MS
MAX_NAMED = 3


def name_blockers(analysis: Analysis, trace: Trace, others: Iterable[Trace]) -> Analysis:
    """``analysis`` with each loop-busy finding's ``blockers`` filled in from ``others`` (the
    trace itself among them is skipped); unchanged when it has no such finding."""
    busy = [i for i, f in enumerate(analysis.findings) if f.kind == "loop-busy" and f.windows]
    if not busy:
        return analysis
    findings = list(analysis.findings)
    others = [o for o in others if o.trace_id != trace.trace_id]
    base = trace.started_at_unix_ns - trace.origin
    for i in busy:
        f = findings[i]
        windows = [(a + trace.origin + base, b + trace.origin + base) for a, b in f.windows]
        found = [b for other in others for b in _steps_in(other, windows)]
        found.sort(key=lambda b: -b.covered_ns)
        findings[i] = dataclasses.replace(f, blockers=tuple(found[:MAX_NAMED]))
    return dataclasses.replace(analysis, findings=findings)


def _steps_in(other: Trace, windows: list[tuple[int, int]]) -> list[Blocker]:
    """``other``'s steps that ran through ``windows`` (wall-clock ns) for MIN_COVER_NS or
    more, each with where the watchdog saw it blocked, else where it was created."""
    base = other.started_at_unix_ns - other.origin
    first, last = windows[0][0] - base, windows[-1][1] - base  # on other's own clock
    out = []
    samples: dict[int, list[tuple[int, tuple[str, ...]]]] | None = None
    request = f"{other.request.get('method', '')} {other.request.get('path', '')}".strip()
    root = other.resources[0].async_id if other.resources else None
    for r in other.resources:
        if r.type not in LOOP_TYPES or not r.callbacks or r.callbacks[0] > last:
            continue
        for a, b in r.intervals():
            if b is None or b <= first or a >= last:
                continue
            covered = sum(max(0, min(b, hi - base) - max(a, lo - base)) for lo, hi in windows)
            if covered < MIN_COVER_NS:
                continue
            if samples is None:
                samples = other.samples_by_resource()
            seen = [frames for at, frames in samples.get(r.async_id, ()) if a <= at <= b]
            stack = seen[0] if seen else (creation_stack(other, r) or ())
            what = request
            if r.async_id != root:
                notes = other.annotations_of(r.async_id)
                what = f"{r.type} {label(r, notes, creation_stack(other, r))}"
            out.append(Blocker(other.trace_id, request, what, b - a, covered, site_of(stack)))
    return out
