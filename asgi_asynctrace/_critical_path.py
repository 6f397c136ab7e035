"""The critical path: the chain of waits that set when a request's response went out.

    path = critical_path(trace, times, children, settings, late, answered, writer, deadlines)
    for step in path:                        # in order; depth 0: a child of the root
        print(step.depth, step.label, step.start, step.end)

_analysis works out its inputs (each resource's times, its children, the timers that ran late
or fired as deadlines) and calls it; what it returns, with the stretches where the request ran
its own code, is ``Analysis.critical_path``. Times are nanoseconds from the request's start.
Exports: critical_path, with_own_work, PathStep, ResourceTimes.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from ._findings import AnalysisSettings, format_duration, site_of
from ._model import Resource, Trace

__all__ = ["PathStep", "ResourceTimes", "critical_path", "with_own_work"]


@dataclass(frozen=True)
class ResourceTimes:
    async_id: int
    type: str
    label: str
    created: int
    ended: int  # settled, or the trace's end for what never settled
    sync: int
    wait: int
    state: str


@dataclass(frozen=True)
class PathStep:
    """One step of the critical path: a resource the request waited on (``depth`` 0 is a child
    of the root), or, with ``type`` "root", a stretch where the request ran its own code."""

    async_id: int
    type: str
    label: str
    start: int
    end: int
    depth: int


def critical_path(
    trace: Trace, times: dict[int, ResourceTimes], children: dict[int, list[Resource]],
    settings: AnalysisSettings, late: dict[int, str], answered: int, writer: int | None,
    deadlines: set[int],
) -> list[PathStep]:  # fmt: skip
    """Walk back from when the response had gone out (``answered``): at each moment, what was
    the root waiting for?

    Among a resource's children, the one that ended last before the moment in question is what
    it waited on; before that child was created, the one that ended last before then; and so
    on back to the resource's creation. Each chosen child is expanded the same way. Futures are
    skipped (what resolved them is on the path instead), and so are cancelled timers (a deadline
    that was never reached held nothing up) and children cancelled because a sibling finished
    (see ``_cancelled_by_a_sibling``). A timer in ``late`` has its lateness added to its label.
    """
    if not trace.resources:
        return []
    root = trace.resources[0]
    by_id = {r.async_id: r for r in trace.resources}
    out: list[PathStep] = []
    slack = 50_000  # 50 us: a parent resumes just after its child ends

    def walk(rid: int, until: int, depth: int, budget: list[int], lead: int | None = None) -> None:
        start = times[rid].created
        picked: list[ResourceTimes] = []
        moment = until
        first = times.get(lead) if lead is not None else None
        if first is not None and first.created < moment and first.ended > start:
            picked.append(first)  # the child the response came from, whenever it ended
            budget[0] -= 1
            moment = first.created
        # Latest-ending first (a remote request ends with its fetch, in joined traces: what the
        # fetch waited for comes first), so each pick is the first still in reach. The moment
        # only moves back: a child that ended after it (slack aside) or was created at or after
        # it is out of reach for good, and is passed once, not looked at again at every pick (a
        # request with thousands of queries under one parent took minutes to analyse).
        mine = [
            times[k.async_id]
            for k in children.get(rid, ())
            if k.type != "future" and not (k.type == "timer" and k.state == "cancelled")
        ]
        skipped = _cancelled_by_a_sibling(mine, by_id[rid].callbacks[::2], trace.origin,
                                          deadlines)  # fmt: skip
        kids = sorted(
            (k for k in mine if k.async_id not in skipped and k.async_id != lead),
            key=lambda k: (k.ended, k.type == "remote-root", -k.created), reverse=True,
        )  # fmt: skip
        i = 0
        while budget[0] > 0:
            while i < len(kids) and not (
                kids[i].created < moment and kids[i].ended <= moment + slack
            ):
                i += 1
            if i == len(kids) or kids[i].ended <= start:
                break
            child = kids[i]
            i += 1
            picked.append(child)
            budget[0] -= 1
            moment = child.created
        for child in reversed(picked):
            rid = child.async_id
            name = child.label + late.get(rid, "")
            end = min(child.ended, until) if rid == lead else child.ended
            out.append(PathStep(rid, child.type, name, child.created, end, depth))
            walk(child.async_id, end, depth + 1, budget)

    # The response came from the last body write: the root's child it was written under is
    # what the root waited for last, even when that child ended a little after it (Django's
    # view task, beside its disconnect listener, which ends as soon as the response is out).
    lead = writer
    while lead is not None and lead in by_id and by_id[lead].trigger_id != root.async_id:
        lead = by_id[lead].trigger_id
    walk(root.async_id, answered, 0, [500], lead if lead in by_id else None)
    seen = [(at - trace.origin, f) for at, f in trace.samples_by_resource().get(root.async_id, ())]
    return with_own_work(root, trace.origin, times[root.async_id], out, settings, seen, answered)


def _cancelled_by_a_sibling(
    kids: list[ResourceTimes], parent_starts: list[int], origin: int, deadlines: set[int]
) -> set[int]:
    """The children cancelled because a sibling finished: each cancelled one alive when a
    sibling that was not cancelled (nor a timer) ended, after which the parent ran a step
    before the cancelled one ended (``asyncio.wait(..., FIRST_COMPLETED)`` then cancel the
    rest, a race, a task group after one child failed, Django's disconnect listener once the
    view answered). Its end was its sibling's doing: what held the parent up is that sibling.
    A child cancelled by a deadline stays (what it was doing is why the deadline hit): one
    whose siblings had all ended before it began, and one a deadline of the parent's (a timer
    in ``deadlines``: one that fired, other than a sleep) cut short after its sibling ended."""
    cancelled = [k for k in kids if k.state == "cancelled" and k.type != "timer"]
    if not cancelled:
        return set()
    ends = sorted(k.ended for k in kids if k.state != "cancelled" and k.type != "timer")
    fired = sorted(k.ended for k in kids if k.async_id in deadlines)
    steps = sorted(at - origin for at in parent_starts)
    out = set()
    for k in cancelled:
        i = bisect.bisect_right(ends, k.ended)
        if i == 0 or ends[i - 1] <= k.created:
            continue  # no sibling finished while it was alive
        f = bisect.bisect_right(fired, ends[i - 1])
        if f < len(fired) and fired[f] <= k.ended:
            continue  # a deadline fired after that, before it ended: the deadline's doing
        j = bisect.bisect_left(steps, ends[i - 1])  # the parent's first step after that
        if j < len(steps) and steps[j] <= k.ended:
            out.add(k.async_id)
    return out


def with_own_work(
    root: Resource, origin: int, root_times: ResourceTimes, path: list[PathStep],
    settings: AnalysisSettings, samples: Sequence[tuple[int, tuple[str, ...]]] = (),
    answered: int | None = None,
) -> list[PathStep]:  # fmt: skip
    """``path`` with the stretches between its top-level steps where the request ran its own
    code (a blocking call, a loop over rows), as steps of the root: without them a request that
    spent most of its time computing shows a critical path that accounts for little of it.

    A stretch is shown when the root ran in it at least ``settings.own_code_ms`` or
    ``settings.own_code_share`` of the request, whichever is less (never under 0.1 ms); it
    spans the root's first to last running moment there, and says where the watchdog saw it
    blocked, when it took a sample there (its first frame of the app's own code).
    """
    end = root_times.ended if answered is None else answered
    floor = max(100_000, min(settings.own_code_ms * 1e6, settings.own_code_share * end))
    cb = root.callbacks
    runs = [
        (cb[i] - origin, (cb[i + 1] if i + 1 < len(cb) else origin + end) - origin)
        for i in range(0, len(cb), 2)
    ]
    if not runs:
        return path
    out: list[PathStep] = []
    since = root_times.created
    for step in [*path, None]:
        if step is not None and step.depth != 0:
            out.append(step)
            continue
        until = end if step is None else step.start
        inside = [(max(a, since), min(b, until)) for a, b in runs if a < until and b > since]
        ran = sum(b - a for a, b in inside)
        if ran >= floor:
            what = f"the request's own code ran {format_duration(ran)}"
            first, last = inside[0][0], inside[-1][1]
            seen = [frames for at, frames in samples if first <= at <= last and frames]
            if seen:
                what += f", blocked at {site_of(seen[0])}"
            out.append(PathStep(root.async_id, "root", what, first, last, 0))
        if step is not None:
            out.append(step)
            since = max(since, step.end)
    return out
