"""The terminal reports of ``summary`` and ``routes``: plain text, stable for golden files.

    print(format_summary(analyze(trace)))

Exports: format_summary, format_routes, format_comparison, format_watch_line, format_ns,
path_runs, PathRun.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from ._analysis import Analysis, PathStep
from ._compare import Comparison, Difference
from ._findings import SEVERITIES, Blocker, format_duration
from ._model import Trace
from ._routes import RouteStats

__all__ = [
    "PathRun",
    "format_comparison",
    "format_ns",
    "format_routes",
    "format_summary",
    "format_watch_line",
    "path_runs",
]


def format_ns(ns: int) -> str:
    """A duration in the summary's columns: ``-`` for none."""
    return format_duration(ns) if ns else "-"


def _unless_ok(state: str) -> str:
    """How a resource ended, when not as expected: cut short by a cancel or an error, or still
    going when the request ended."""
    return "" if state == "ok" else f" ({state})"


def _after_the_response(a: Analysis) -> list[str]:
    """A line when the request's handling went on a while after its response had gone out
    (where the critical path ends): at least 1 ms, and 5 % of the request."""
    after = a.duration - a.answered
    if a.answered < 0 or after < max(1_000_000, a.duration // 20):
        return []
    return [f"  its response had gone out at {format_ns(a.answered)}; the {format_ns(after)} "
            "after it (cleanup, background tasks) kept no client waiting"]  # fmt: skip


def _fix_first(a: Analysis) -> list[str]:
    """The costliest finding in one line under the headline: where to look first (the
    findings, ranked by cost, close the report with their fixes)."""
    if not a.findings:
        return []
    f = a.findings[0]
    where = f" at {f.site}" if f.site else ""
    costs = f", costs {format_ns(f.cost_ns)}" if f.cost_ns else ""
    more = len(a.findings) - 1
    rest = f" ({more} more below)" if more else " (below)"
    return [f"  fix first: {f.kind}{where}{costs}{rest}"]


def format_summary(a: Analysis) -> str:
    """The terminal report of ``summary``: plain text, no colour, stable for golden files."""
    lines = [
        f"{_head(a) or 'request'}  {format_ns(a.duration)}  trace {a.trace_id}",
        f"  the request's own code ran {format_ns(a.root_sync)} on the loop; "
        f"it waited {format_ns(max(0, a.duration - a.root_sync))}",
        *_after_the_response(a),
        *_fix_first(a),
        "",
        f"  {'type':<14}{'count':>6}{'sync':>12}{'wait':>12}",
    ]
    for rtype, row in a.by_type.items():
        sync, wait = format_ns(row["sync"]), format_ns(row["wait"])
        lines.append(f"  {rtype:<14}{row['count']:>6}{sync:>12}{wait:>12}")
    for key, title in (("wait", "longest waits"), ("sync", "most time running")):
        rows = [t for t in a.top(key) if getattr(t, key) > 0]
        if rows:
            lines += ["", f"  {title}"]
            lines += [
                f"  {format_ns(getattr(t, key)):>10}  {t.type} {t.label}{_unless_ok(t.state)}"
                f"  #{t.async_id}"
                for t in rows
            ]
    lines += ["", "  critical path (what held the request up, in order)"]
    if not a.critical_path:
        lines.append("    nothing: the request never waited on anything it started")
    lines += _path_lines(a.critical_path)
    lines += ["", "  findings"]
    if not a.findings:
        lines.append("    none: nothing held this request up beyond its own work")
    for f in a.findings:
        lines.append(f"    [{f.severity}] {f.kind}: {f.title}")
        if f.cost_ns:
            lines.append(f"        costs {format_ns(f.cost_ns)}")
        lines.append(f"        fix: {f.fix}")
        if f.site:
            lines.append(f"        at {f.site}")
            if f.kind == "blocked-loop" and f.stack[0] != f.site:  # what it was blocked in
                lines.append(f"        in {f.stack[0]}")
        for b in f.blockers:  # the process's other traced requests that held the loop then
            lines.append(f"        held by {format_blocker(b)}")
    return "\n".join(lines) + "\n"


def format_blocker(b: Blocker) -> str:
    """``GET /slow: ran 31.7 ms at slow_report @ app.py:204:5 (trace 1a2b…)``."""
    where = f" at {b.site}" if b.site else ""
    return f"{b.label}: ran {format_ns(b.ran_ns)}{where} (trace {b.trace_id})"


def _what(step: PathStep) -> str:
    return step.label if step.type == "root" else f"{step.type} {step.label}"


@dataclass(frozen=True)
class PathRun:
    """Steps of the critical path in a row: ``steps`` once (``reps`` 1), or the same steps
    (by depth, type and label: a query per row and what follows it) ``reps`` times over."""

    steps: tuple[PathStep, ...]  # the first time round
    last: tuple[PathStep, ...]  # the last time round (the same as steps when reps is 1)
    reps: int
    start: int
    end: int


def path_runs(path: Sequence[PathStep]) -> list[PathRun]:
    """The critical path with each run of the same one, two or three steps, three times or
    more, as one ``PathRun`` (the longest such run wins); what ``summary`` and the viewer list."""
    key = [(s.depth, s.type, s.label) for s in path]
    out = []
    i = 0
    while i < len(path):
        period, reps = 1, 1
        for p in (1, 2, 3):
            n = 1
            while key[i + n * p : i + (n + 1) * p] == key[i : i + p]:
                n += 1
            if n >= 3 and p * n > period * reps:
                period, reps = p, n
        run = path[i : i + period * reps]
        out.append(PathRun(tuple(run[:period]), tuple(run[-period:]), reps, run[0].start,
                           max(s.end for s in run)))  # fmt: skip
        i += period * reps
    return out


def _path_lines(path: Sequence[PathStep]) -> list[str]:
    """The critical path, one line a step; a run of the same steps, one line a step of the
    run, the first counted and with the time the whole run took."""
    lines = []
    for run in path_runs(path):
        for j, (first, last) in enumerate(zip(run.steps, run.last, strict=True)):
            when = f"{format_ns(run.start):>10} → {format_ns(run.end):<10}" if j == 0 else " " * 23
            if run.reps == 1:
                lines.append(f"  {when}{'  ' * first.depth}{_what(first)}  #{first.async_id}")
                continue
            count = f"{run.reps} x " if j == 0 else "then "
            lines.append(
                f"  {when}{'  ' * first.depth}{count}{_what(first)}"
                f"  #{first.async_id} … #{last.async_id}"
            )
    return lines


def _shares(held: Counter[str], most: int | None = None) -> str:
    """``fetch 78 %, own code 8 %``: what held a request up, the largest share first (the
    ``most`` largest, when given)."""
    total = sum(held.values())
    if not total:
        return "-"
    parts = []
    for kind, ns in held.most_common(most):
        share = 100 * ns / total
        if share >= 0.5:
            parts.append(f"{kind} {share:.0f} %")
    return ", ".join(parts) or "-"


def format_routes(routes: Sequence[RouteStats]) -> str:
    """The terminal report of ``routes``: plain text, stable for golden files."""
    traces = sum(r.count for r in routes)
    lines = [f"{traces} trace(s), {len(routes)} route(s), the slowest (95th percentile) first"]
    for r in routes:
        lines += [
            "",
            f"{r.method} {r.route}  ({r.count} trace{'s' if r.count != 1 else ''})",
            f"  duration     median {format_ns(r.percentile(50))}   95th percentile "
            f"{format_ns(r.percentile(95))}   longest {format_ns(max(r.durations))}",
            f"  held up by   {_shares(r.held)}",
        ]
        if r.findings:
            found = ", ".join(f"{kind} in {n} ({r.worst[kind]})"
                              for kind, n in r.findings.most_common())  # fmt: skip
            lines.append(f"  findings     {found}")
        else:
            lines.append("  findings     none")
        lines.append(f"  slowest      {r.slowest[1]}  {format_ns(r.slowest[0])}")
    return "\n".join(lines) + "\n"


def _signed(ns: int) -> str:
    return "0" if not ns else ("+" if ns > 0 else "-") + format_ns(abs(ns))


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _head(a: Analysis) -> str:
    req = a.request
    return " ".join(str(x) for x in (req.get("method"), req.get("path"), req.get("status")) if x)


_MAX_OPERATIONS = 10


def format_comparison(c: Comparison) -> str:
    """The terminal report of ``compare``: plain text, stable for golden files."""
    base = c.baseline
    fa, sa = c.faster, c.slower
    lines = [
        f"{c.route or 'the slower'}: {format_ns(sa.duration)} (trace {sa.trace_id[:12]}) "
        f"against {format_ns(fa.duration)} for the {base} one (trace {fa.trace_id[:12]}): "
        f"{_signed(c.delta)}",
    ]
    if _head(sa) != _head(fa):  # a route's two paths, or two routes
        lines.append(f"  the slower: {_head(sa)}; the {base}: {_head(fa)}")
    lines += [
        "",
        f"  {'what held it up (critical path)':<44}{base:>10}{'slower':>10}{'difference':>12}",
    ]
    for d in c.held:
        lines.append(f"  {_fit(d.what, 42):<44}{format_ns(d.ns[0]):>10}{format_ns(d.ns[1]):>10}"
                     f"{_signed(d.delta):>12}")  # fmt: skip
    lines += ["", f"  {'operations (how many, how long alive)':<44}{base:>16}{'slower':>16}"
                  f"{'difference':>12}"]  # fmt: skip
    if not c.operations:
        lines.append("    the same operations, as long in both")
    for d in c.operations[:_MAX_OPERATIONS]:
        lines.append(f"  {_fit(d.what, 42):<44}{_cell(d, 0):>16}{_cell(d, 1):>16}"
                     f"{_signed(d.delta):>12}{_more(d)}")  # fmt: skip
    if len(c.operations) > _MAX_OPERATIONS:
        lines.append(f"  … and {len(c.operations) - _MAX_OPERATIONS} more that differ (--json)")
    lines += [
        "",
        f"  findings only in the slower: {', '.join(c.only_slower) or 'none'}",
        f"  findings only in the {base} one: {', '.join(c.only_faster) or 'none'}",
    ]
    return "\n".join(lines) + "\n"


def _cell(d: Difference, side: int) -> str:
    return f"{d.count[side]} x {format_ns(d.ns[side])}" if d.count[side] else "-"


def _more(d: Difference) -> str:
    more = d.count[1] - d.count[0]
    return f"  ({more:+d})" if more else ""


def format_watch_line(trace: Trace, a: Analysis, held: Counter[str]) -> str:
    """One trace as ``watch`` prints it: when it started (local time), the request, its
    duration, what held it up (the two largest shares), its worst finding, its id."""
    import time

    when = (time.strftime("%H:%M:%S", time.localtime(trace.started_at_unix_ns / 1e9))
            if trace.started_at_unix_ns else "--:--:--")  # fmt: skip
    worst = max(a.findings, key=lambda f: SEVERITIES.index(f.severity), default=None)
    found = f"  [{worst.severity}] {worst.kind}" if worst is not None else ""
    return (f"{when}  {_fit(_head(a), 40):<40} {format_ns(a.duration):>9}  "
            f"{_fit(_shares(held, 2), 34):<34}{found}  {a.trace_id[:12]}")  # fmt: skip
