"""The diagnoses: what held a request up, each a finding with its cost and a one-line fix.

    findings = diagnose(trace, times, children, path, notes, AnalysisSettings(), duration)

Called by ``analyze()``, which has worked out each resource's times and the critical path.
Kinds: repeated-read, sequential-awaits and n-plus-one (in ``_reads``), blocked-loop (a long
step on the loop), loop-busy (ready, but the loop ran other work), slow-upstream (one call
taking most of the request), thread-starvation (a job waiting for a worker), unawaited-task
(still running at the end). Ranked by the time they cost. Exports: diagnose, Finding,
AnalysisSettings, SEVERITIES, IO_TYPES.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from ._model import Resource, Trace, frame_origin
from ._reads import n_plus_one, repeated_reads, runs

if TYPE_CHECKING:
    from ._analysis import PathStep, ResourceTimes

__all__ = ["IO_TYPES", "SEVERITIES", "AnalysisSettings", "Finding", "diagnose", "site_of"]

MS: Final = 1_000_000
# What a request waits on: the operations a diagnosis talks about.
IO_TYPES: Final = frozenset(
    {
        "fetch", "db-query", "cache-get", "cache-put", "cache-delete",
        "kv-get", "kv-put", "kv-delete", "kv-list", "kv-pipeline", "kv-command",
        "queue-send", "queue-receive",
        "thread", "websocket",
    }
)  # fmt: skip
# Runs its callbacks on the event loop (a long one blocks every other request).
LOOP_TYPES: Final = frozenset({"root", "task", "timer"})
SEVERITIES: Final = ("low", "medium", "high")


@dataclass(frozen=True)
class AnalysisSettings:
    """Thresholds of the diagnoses (milliseconds, or a share of the request's duration)."""

    blocked_step_ms: float = 20.0  # one step on the loop longer than this blocks it
    sequential_gap_ms: float = 2.0  # the parent ran at most this long between two operations
    min_cost_ms: float = 1.0  # findings that would save less are not reported
    n_plus_one_min: int = 3  # this many repeats from one call site in a row is N+1
    slow_upstream_share: float = 0.5  # one operation taking this share of the request...
    slow_upstream_ms: float = 100.0  # ...and at least this long is a slow upstream
    thread_queue_ms: float = 10.0  # a thread job waiting this long to start
    # the request ready to go on (its timer due, a future it awaited settled) but the loop
    # running other work, not this request's, for this long
    loop_busy_ms: float = 20.0
    high_share: float = 0.25  # a finding costing this share of the request is high severity
    medium_share: float = 0.05
    # The critical path shows a stretch of the request's own code between its waits when it
    # ran at least this long or this share of the request (whichever is less; never < 0.1 ms).
    own_code_ms: float = 1.0
    own_code_share: float = 0.05


def site_of(stack: Sequence[str]) -> str:
    """A stack's first frame of the app's own code (else its first frame; "" for none)."""
    for frame in stack:
        if frame_origin(frame) == "app":
            return frame
    return stack[0] if stack else ""


@dataclass(frozen=True)
class Blocker:
    """A step of another traced request of the same process that ran while a request waited
    for the loop (see ``_blockers``): the request it belongs to, what ran, for how long, how
    much of the wait it covered, and where (the watchdog's sample, else its creation site)."""

    trace_id: str
    request: str  # "GET /slow"
    label: str  # the resource whose step it was: the request itself, or "task name"
    ran_ns: int
    covered_ns: int
    site: str

    def to_dict(self) -> dict[str, Any]:
        return {"traceId": self.trace_id, "request": self.request, "label": self.label,
                "ranNs": self.ran_ns, "coveredNs": self.covered_ns, "site": self.site}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Blocker:
        """The inverse of ``to_dict`` (as the store's ``?analysis=1`` gives it)."""
        return cls(str(d["traceId"]), str(d["request"]), str(d["label"]), int(d["ranNs"]),
                   int(d["coveredNs"]), str(d["site"]))  # fmt: skip


@dataclass(frozen=True)
class Finding:
    kind: str  # repeated-read, sequential-awaits, n-plus-one, blocked-loop, loop-busy,
    # slow-upstream, thread-starvation, unawaited-task
    title: str
    cost_ns: int  # the time it cost the request (what fixing it would save, at most)
    resources: tuple[int, ...]
    fix: str
    severity: str
    stack: tuple[str, ...] = ()
    # loop-busy: when the request waited for the loop (ns from its start), and, where other
    # traces of the process were at hand, the steps of theirs that ran then (see _blockers)
    windows: tuple[tuple[int, int], ...] = ()
    blockers: tuple[Blocker, ...] = ()

    @property
    def site(self) -> str:
        """Where in the app's own code it happened: its first app frame (else the first)."""
        return site_of(self.stack)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "title": self.title,
            "costNs": self.cost_ns,
            "resources": list(self.resources),
            "fix": self.fix,
            "severity": self.severity,
            "site": self.site,
            "stack": list(self.stack),
            **({"windowsNs": [list(w) for w in self.windows]} if self.windows else {}),
            **({"blockers": [b.to_dict() for b in self.blockers]} if self.blockers else {}),
        }


def _severity(cost: int, duration: int, s: AnalysisSettings) -> str:
    share = cost / duration if duration > 0 else 0.0
    if share >= s.high_share:
        return "high"
    if share >= s.medium_share:
        return "medium"
    return "low"


def format_duration(ns: int) -> str:
    """A duration as a person reads one: ``12.3 ms``, or ``850 µs`` under a millisecond (where
    a tenth of a millisecond would round most of what a fast request does to ``0.0 ms``)."""
    if -999_500 < ns < 999_500:
        return f"{ns / 1e3:.0f} µs"
    return f"{ns / MS:.1f} ms"


def diagnose(
    trace: Trace,
    times: dict[int, ResourceTimes],
    children: dict[int, list[Resource]],
    path: list[PathStep],
    notes: dict[int, dict[str, Any]],
    s: AnalysisSettings,
    duration: int,
) -> list[Finding]:
    found: list[Finding] = []
    by_id = {r.async_id: r for r in trace.resources}

    def stack_of(rid: int) -> tuple[str, ...]:
        sid = by_id[rid].stack_id
        return trace.stacks[sid] if sid is not None and sid < len(trace.stacks) else ()

    def add(
        kind: str, title: str, cost: int, rids: tuple[int, ...], fix: str,
        stack: tuple[str, ...] | None = None, windows: tuple[tuple[int, int], ...] = (),
    ) -> None:  # fmt: skip
        """A finding, unless it costs too little; where it happened is ``stack``, else the
        creation stack of its first resource."""
        if cost < s.min_cost_ms * MS and kind != "unawaited-task":
            return
        where = stack_of(rids[0]) if stack is None else stack
        severity = _severity(cost, duration, s)
        found.append(Finding(kind, title, cost, rids, fix, severity, where, windows))

    # Repeated reads: the same read again, nothing written to it in between. N+1: one call
    # site issuing the same operation again and again, each after the last ended, whatever the
    # loop does in between. Sequential awaits: the other runs of operations under one parent,
    # each starting after the previous one ended, the parent doing next to nothing in between.
    repeats = repeated_reads(trace, times, path, notes, add, stack_of)
    gap = s.sequential_gap_ms * MS
    for kids in children.values():
        ops = sorted((times[k.async_id] for k in kids
                      if k.type in IO_TYPES and k.async_id not in repeats),
                     key=lambda t: t.created)  # fmt: skip
        in_n1 = n_plus_one(ops, by_id, add, s)
        run: list[ResourceTimes] = []
        for op in ops:
            if op.async_id in in_n1:
                runs(run, notes, add)
                run = []
            elif run and run[-1].ended <= op.created <= run[-1].ended + gap:
                run.append(op)
            else:
                runs(run, notes, add)
                run = [op]
        runs(run, notes, add)

    # The loop blocked: one step on the loop longer than the threshold. Where it was blocked
    # is the first stack the watchdog took in that step, when it took one; else the stack
    # that created the resource.
    limit = s.blocked_step_ms * MS
    sampled = trace.samples_by_resource()
    collections: dict[int, list[Resource]] = {}
    for r in trace.resources:
        if r.type == "gc" and r.callbacks:
            collections.setdefault(r.trigger_id, []).append(r)
    for r in trace.resources:
        if r.type not in LOOP_TYPES:
            continue
        for start, end in r.intervals():
            stop = end if end is not None else trace.origin + duration
            ran = stop - start
            if ran < limit:
                continue
            t = times[r.async_id]
            seen = [f for at, f in sampled.get(r.async_id, ()) if start <= at <= stop]
            gcs = [g for g in collections.get(r.async_id, ()) if start <= g.callbacks[0] <= stop]
            in_gc = sum(min(g.callbacks[-1], stop) - g.callbacks[0] for g in gcs)
            title = f"{t.label} ran {format_duration(ran)} without yielding"
            fix = ("move the blocking call off the loop (asyncio.to_thread, an async client) or "
                   "split the work with await points")  # fmt: skip
            if in_gc:
                top = max(int(notes.get(g.async_id, {}).get("generation", 0)) for g in gcs)
                title += (
                    f", {format_duration(in_gc)} of it in garbage collection (generation {top})"
                )
                if 2 * in_gc >= ran:
                    fix = ("the garbage collector ran in this step: call gc.freeze() once the app "
                           "has started, so what it loaded stays out of every collection, or "
                           "raise its thresholds (gc.set_threshold)")  # fmt: skip
            add(
                "blocked-loop",
                title + ": every other request on this process waited",
                ran,
                (r.async_id, *(g.async_id for g in gcs)),
                fix,
                seen[0] if seen else None,
            )

    _loop_busy(trace, by_id, times, notes, s, duration, path, add)

    # A slow upstream: one operation dominating the critical path.
    for step in path:
        if step.type in IO_TYPES and step.type != "thread":
            took = step.end - step.start
            if took >= s.slow_upstream_ms * MS and took >= s.slow_upstream_share * duration:
                add("slow-upstream",
                    f"{step.type} {step.label} took {format_duration(took)}, "
                    f"{100 * took // duration}% of the request", took, (step.async_id,),
                    "cache its result, set a tighter timeout, or make the upstream faster; "
                    "nothing else in this request matters as much")  # fmt: skip

    # Thread-pool starvation: jobs that waited long for a worker.
    queued = s.thread_queue_ms * MS
    for r in trace.resources:
        if r.type == "thread" and r.callbacks:
            delay = r.callbacks[0] - r.created_at
            if delay >= queued:
                add("thread-starvation",
                    f"{times[r.async_id].label} waited {format_duration(delay)} for a free "
                    "worker thread",
                    delay, (r.async_id,),
                    "the thread pool is saturated: make the blocking calls async, or give the "
                    "executor (anyio's limiter for Starlette) more workers")  # fmt: skip

    # Tasks nobody waited for, still running when the request ended.
    for r in trace.resources:
        if r.type == "task" and r.state == "pending":
            add("unawaited-task",
                f"task {times[r.async_id].label} was still pending when the request ended",
                0, (r.async_id,),
                "await it, keep a reference and cancel it on the way out, or make it a "
                "BackgroundTask so its lifetime is explicit")  # fmt: skip

    found.sort(key=lambda f: (-f.cost_ns, f.kind, f.resources))
    return found


def next_step(waiter: Resource | None, ready: int) -> int | None:
    """When ``waiter`` (a task, or the request's root) began its first step after ``ready``,
    the moment what it waited on was over; None when it was running a step then (it did not
    wait: an operation of its own ended in it), ran none after, or is not a task or the root."""
    if waiter is None or waiter.type not in LOOP_TYPES:
        return None
    cb = waiter.callbacks
    i = bisect.bisect_left(cb, ready)  # cb: step starts (even) and ends (odd), in order
    if i % 2 == 1 or i == len(cb):
        return None  # inside a step of the waiter's, or none after
    return int(cb[i])


def _loop_busy(
    trace: Trace, by_id: dict[int, Resource], times: dict[int, ResourceTimes],
    notes: dict[int, dict[str, Any]], s: AnalysisSettings, duration: int,
    path: list[PathStep], add: Any,
) -> None:  # fmt: skip
    """The loop busy elsewhere: the request was ready to go on but the loop ran other work
    first, for at least ``s.loop_busy_ms``: another request's blocking step, a background task,
    code outside any trace. Seen where a timer of the request ran late (its ``lateMs``), and
    where what a task (or the request) waited on was over long before its next step began,
    while it ran no step: what it is known to wait on anywhere (its sleep's timer, a future
    it awaited), and what the critical path says it waited on (a task, a query). The time
    this request's own steps ran in such a window is left out (that is blocked-loop's to
    say), and windows that overlap count once."""
    own = _Spans(
        (a, b if b is not None else trace.origin + duration)
        for r in trace.resources if r.type in LOOP_TYPES for a, b in r.intervals()
    )  # fmt: skip
    windows: list[tuple[int, int, int]] = []  # (ready, went on, the resource that waited)

    def resumed(waiter_id: int | None, ready: int, rid: int) -> None:
        went_on = next_step(by_id.get(waiter_id) if waiter_id is not None else None, ready)
        if went_on is not None:
            windows.append((ready, went_on, rid))

    for r in trace.resources:
        if r.type == "timer" and r.callbacks:
            note = notes.get(r.async_id, {})
            late = note.get("lateMs")
            if isinstance(late, int | float) and late > 0:
                windows.append((r.callbacks[0] - round(late * MS), r.callbacks[0], r.async_id))
            if note.get("kind") == "sleep":  # its future is not recorded: the timer is the wait
                resumed(r.trigger_id, r.callbacks[min(1, len(r.callbacks) - 1)], r.async_id)
        elif r.type == "future" and r.settled_at is not None:
            for rid in r.awaited_by or ():
                resumed(rid, r.settled_at, r.async_id)
    for step in path:  # what each task and the request waited on, one after another
        waited = by_id.get(step.async_id)
        if waited is not None and step.type != "root" and waited.settled_at is not None:
            resumed(waited.trigger_id, waited.settled_at, step.async_id)
    busy = s.loop_busy_ms * MS
    held = [w for w in windows if w[1] - w[0] - own.within(w[0], w[1]) >= busy]
    if not held:
        return
    union = _Spans((ready, went_on) for ready, went_on, _ in held)
    other = sum(b - a - own.within(a, b) for a, b in zip(union.starts, union.ends, strict=True))
    ready, went_on, rid = max(held, key=lambda w: w[1] - w[0])
    t = times[rid]
    add(
        "loop-busy",
        f"{t.type} {t.label} was ready {format_duration(went_on - ready)} before the loop got "
        f"back to it: {format_duration(other)} of this request went to other work on the loop",
        other,
        (rid, *sorted({w[2] for w in held} - {rid})),
        "something else held the event loop then (another request, a background task, or the "
        "process was not given the CPU): look for a blocked-loop finding in the traces of "
        "requests running at that moment, keep blocking calls off the loop "
        "(asyncio.to_thread), or spread the load over more worker processes",
        None,
        tuple(
            zip(
                [a - trace.origin for a in union.starts],
                [b - trace.origin for b in union.ends],
                strict=True,
            )
        ),
    )


class _Spans:
    """Time spans, merged where they overlap, for how much of any window they cover."""

    def __init__(self, spans: Iterable[tuple[int, int]]) -> None:
        merged: list[list[int]] = []
        for a, b in sorted(spans):
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        self.starts = [a for a, _ in merged]
        self.ends = [b for _, b in merged]
        self.before = list(itertools.accumulate((b - a for a, b in merged), initial=0))

    def within(self, a: int, b: int) -> int:
        """How long the spans cover between ``a`` and ``b``."""
        if b <= a:
            return 0
        i = bisect.bisect_right(self.ends, a)  # the first span ending after a
        j = bisect.bisect_left(self.starts, b)  # the spans from i up to j start before b
        if i >= j:
            return 0
        covered = self.before[j] - self.before[i]
        covered -= max(0, a - self.starts[i])  # the first one cut at a
        covered -= max(0, self.ends[j - 1] - b)  # the last one cut at b
        return covered
