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
``_findings``, the walk of the critical path in ``_critical_path``.
Exports: analyze, Analysis, label, creation_stack (and, from _critical_path, ResourceTimes and
PathStep; from _findings, Finding, AnalysisSettings, SEVERITIES).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ._critical_path import PathStep, ResourceTimes, critical_path
from ._findings import MS, SEVERITIES, AnalysisSettings, Finding, diagnose, next_step
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
    late = _late(trace, notes, s)
    # the timers that fired, but for sleeps: deadlines (and callbacks set for later)
    deadlines = {
        rid for rid, t in times.items()
        if t.type == "timer" and t.state == "ok" and notes[rid].get("kind") != "sleep"
    }  # fmt: skip
    path = critical_path(trace, times, children, s, late, answered, writer, deadlines)
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


def _late(trace: Trace, notes: dict[int, dict[str, Any]], settings: AnalysisSettings
          ) -> dict[int, str]:  # fmt: skip
    """What the critical path adds to a step's name when the loop was late for it, by
    ``loop_busy_ms`` or more: ``, ran 47.8 ms late`` for a timer that ran that long after its
    deadline (its ``lateMs``); ``, the loop got back to it 30.0 ms later`` for anything whose
    waiter went on that long after it was over (a sleep's timer, a task, a query). A 5 ms
    sleep that took 53 ms, or a hole after a step, says why."""
    out = {}
    by_id = {r.async_id: r for r in trace.resources}
    busy = settings.loop_busy_ms
    for r in trace.resources:
        said = []
        late = notes.get(r.async_id, {}).get("lateMs") if r.type == "timer" else None
        if isinstance(late, (int, float)) and late >= busy:
            said.append(f"ran {late:.1f} ms late")
        if r.settled_at is not None and r.async_id != r.trigger_id:
            went_on = next_step(by_id.get(r.trigger_id), r.settled_at)
            if went_on is not None and went_on - r.settled_at >= busy * MS:
                said.append(f"the loop got back to it {(went_on - r.settled_at) / MS:.1f} ms later")
        if said:
            out[r.async_id] = ", " + ", ".join(said)
    return out
