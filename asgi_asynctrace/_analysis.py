"""Where a request's time went, and what held it up: pure functions over the trace model.

    report = analyze(trace)                  # or analyze(load_trace(data))
    report.critical_path                     # the chain of waits that set the end time
    for finding in report.findings:          # ranked by the time they cost
        print(finding.severity, finding.title, finding.fix)

Times are nanoseconds from the request's start. A resource's *sync* time is the sum of its
callback intervals (code running on the loop, or in a worker thread); its *wait* time is the rest
of its life, from creation to settlement (none for a timer other than a sleep that never fired,
cancelled or still pending when the request ended: a deadline that was not reached, whose
request waited on what it guarded, or a callback set for later). The CLI, the viewer and
``asgi_asynctrace.testing`` all read traces through this module; the diagnoses themselves are in
``_findings``.
Exports: analyze, Analysis, ResourceTimes, PathStep, label, creation_stack (and, from _findings,
Finding, AnalysisSettings, SEVERITIES).
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ._findings import (
    SEVERITIES,
    AnalysisSettings,
    Finding,
    diagnose,
    format_duration,
    site_of,
)
from ._model import Resource, Trace

__all__ = [
    "SEVERITIES",
    "Analysis",
    "AnalysisSettings",
    "Finding",
    "PathStep",
    "ResourceTimes",
    "analyze",
    "creation_stack",
    "label",
]


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


@dataclass
class Analysis:
    trace_id: str
    request: dict[str, Any]
    duration: int
    times: dict[int, ResourceTimes]
    by_type: dict[str, dict[str, int]]  # type -> count, sync, wait
    critical_path: list[PathStep]
    findings: list[Finding] = field(default_factory=list)
    # when the response had gone out (its last body write ended): the critical path ends there;
    # what the request's handling did after it (cleanup, background tasks) kept no client
    # waiting. The duration where there was no response body.
    answered: int = -1

    @property
    def root_sync(self) -> int:
        return self.times[1].sync if 1 in self.times else 0

    def top(self, key: str, n: int = 5) -> list[ResourceTimes]:
        """The ``n`` resources (root excepted) with the most ``sync`` or ``wait`` time."""
        rows = [t for t in self.times.values() if t.type != "root"]
        return sorted(rows, key=lambda t: (-getattr(t, key), t.async_id))[:n]

    def to_dict(self) -> dict[str, Any]:
        return {
            "traceId": self.trace_id,
            "request": self.request,
            "durationNs": self.duration,
            "rootSyncNs": self.root_sync,
            "byType": self.by_type,
            "criticalPath": [
                {
                    "asyncId": s.async_id,
                    "type": s.type,
                    "label": s.label,
                    "start": s.start,
                    "end": s.end,
                    "depth": s.depth,
                }
                for s in self.critical_path
            ],
            "findings": [f.to_dict() for f in self.findings],
            "answeredNs": self.answered if self.answered >= 0 else self.duration,
        }


def _short(name: str) -> str:
    """``outer.<locals>.inner`` -> ``inner``; ``Class.method`` stays."""
    return name.rsplit("<locals>.", 1)[-1]


def creation_stack(trace: Trace, res: Resource) -> Sequence[str] | None:
    """The frames of the stack that created ``res``, innermost first (None: none captured)."""
    sid, stacks = res.stack_id, trace.stacks
    return stacks[sid] if sid is not None and 0 <= sid < len(stacks) else None


_BODIES = {"stream-read": "request body", "stream-write": "response body"}


def label(res: Resource, notes: dict[str, Any], stack: Sequence[str] | None = None) -> str:
    """A short human name: the URL of a fetch, the statement of a query, a task's coroutine,
    the function that made a future (from its creation ``stack``, when there is one), the size
    of a body or websocket message."""
    t = res.type
    if t == "future" and stack:
        return _short(stack[0].split(" @ ", 1)[0])
    if t == "fetch":
        return f"{notes.get('method', '')} {notes.get('url', '')}".strip() or t
    if t == "db-query":
        return str(notes.get("statement", t))
    if t == "kv-pipeline":
        return f"{notes.get('count', '?')} commands: {notes.get('commands', '')}"
    if t.startswith(("cache-", "kv-")):
        what = notes.get("key", f"{notes['keys']} keys" if "keys" in notes else "")
        return f"{notes.get('op', notes.get('command', t))} {what}".strip()
    if t == "task":
        return _short(str(notes.get("coroutine", t)))
    if t == "thread":
        return _short(str(notes.get("function", t)))
    if t == "timer":
        delay = notes.get("delayMs", "?")
        # 19.993 for a deadline 20 ms away, as worked out from the loop's clock: to a tenth
        if isinstance(delay, float) and delay >= 1 and round(delay, 1) != delay:
            delay = round(delay, 1)
        return f"{notes.get('kind', 'timer')} {delay}ms"
    if t == "root":
        return f"{notes.get('method', '')} {notes.get('path', '')}".strip() or t
    if t == "gc":
        return f"generation {notes.get('generation', '?')}"
    if t in _BODIES:
        return f"{_BODIES[t]}, {notes.get('bytes', '?')} bytes"
    if t == "websocket":
        size = f", {notes['bytes']} bytes" if "bytes" in notes else ""
        return f"{notes.get('direction', '')} {notes.get('message', '')}".strip() + size
    return str(notes.get("name", t))


def analyze(trace: Trace, settings: AnalysisSettings | None = None) -> Analysis:
    """Time categories, the critical path and the ranked findings of one trace."""
    s = settings or AnalysisSettings()
    o = trace.origin
    duration = trace.duration_ns
    notes: dict[int, dict[str, Any]] = defaultdict(dict)
    for rid, key, value in trace.annotations:
        notes[rid][key] = value
    times: dict[int, ResourceTimes] = {}
    for r in trace.resources:
        times[r.async_id] = _times(r, o, duration, notes[r.async_id], creation_stack(trace, r))
    by_type: dict[str, dict[str, int]] = {}
    for t in times.values():
        row = by_type.setdefault(t.type, {"count": 0, "sync": 0, "wait": 0})
        row["count"] += 1
        row["sync"] += t.sync
        row["wait"] += t.wait
    children: dict[int, list[Resource]] = defaultdict(list)
    for r in trace.resources:
        children[r.trigger_id].append(r)
    answered, writer = _answered(trace, times)
    late = _late_timers(times, notes, s)
    # the timers that fired, but for sleeps: deadlines (and callbacks set for later)
    deadlines = {
        rid for rid, t in times.items()
        if t.type == "timer" and t.state == "ok" and notes[rid].get("kind") != "sleep"
    }  # fmt: skip
    path = _critical_path(trace, times, children, s, late, answered, writer, deadlines)
    findings = diagnose(trace, times, children, path, notes, s, duration)
    return Analysis(
        trace_id=trace.trace_id,
        request=dict(trace.request),
        duration=duration,
        times=times,
        by_type=dict(sorted(by_type.items(), key=lambda kv: -kv[1]["wait"] - kv[1]["sync"])),
        critical_path=path,
        findings=findings,
        answered=answered,
    )


def _answered(trace: Trace, times: dict[int, ResourceTimes]) -> tuple[int, int | None]:
    """When the response had gone out, and the write that finished it: the end of its last
    body write (the root's end, and None, for a request that wrote none: a websocket's)."""
    end = times[trace.resources[0].async_id].ended if trace.resources else 0
    writes = [times[r.async_id] for r in trace.resources if r.type == "stream-write"]
    if not writes:
        return end, None
    last = max(writes, key=lambda t: t.ended)
    return min(last.ended, end), last.async_id


def _no_wait(r: Resource, notes: dict[str, Any]) -> bool:
    """A timer nothing in the request waited on: one that never fired (cancelled, or still
    pending when the request ended) and is not a sleep. A deadline cancelled before it was
    reached, a cache entry's expiry set for later or cancelled by a delete: the request
    waited on something else meanwhile. A sleep is what its task awaited, fired or not."""
    never_fired = r.state in ("cancelled", "pending")
    return r.type == "timer" and never_fired and notes.get("kind") != "sleep"


def _times(
    r: Resource, o: int, duration: int, notes: dict[str, Any], stack: Sequence[str] | None
) -> ResourceTimes:
    cb = r.callbacks
    sync = 0
    for i in range(0, len(cb), 2):
        end = cb[i + 1] if i + 1 < len(cb) else o + duration
        sync += max(0, end - cb[i])
    created = r.created_at - o
    if r.settled_at is not None:
        ended = r.settled_at - o
    elif cb and len(cb) % 2 == 0 and r.type in ("thread",):
        ended = cb[-1] - o
    else:
        ended = duration
    ended = max(ended, created)
    waited = ended - created - sync
    if _no_wait(r, notes):
        waited = 0
    return ResourceTimes(
        async_id=r.async_id,
        type=r.type,
        label=label(r, notes, stack),
        created=created,
        ended=ended,
        sync=sync,
        wait=max(0, waited),
        state=r.state,
    )


def _late_timers(
    times: dict[int, ResourceTimes], notes: dict[int, dict[str, Any]], settings: AnalysisSettings
) -> dict[int, str]:
    """``, ran 47.8 ms late`` for each timer that ran ``loop_busy_ms`` or more after its
    deadline (its ``lateMs``): on the critical path, a 5 ms sleep that took 53 ms says why."""
    out = {}
    for rid, t in times.items():
        late = notes.get(rid, {}).get("lateMs") if t.type == "timer" else None
        if isinstance(late, (int, float)) and late >= settings.loop_busy_ms:
            out[rid] = f", ran {late:.1f} ms late"
    return out


def _critical_path(
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
    return _with_own_work(root, trace.origin, times[root.async_id], out, settings, seen, answered)


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


def _with_own_work(
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
