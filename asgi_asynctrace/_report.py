"""The terminal report of ``asgi-asynctrace summary``: plain text, stable for golden files.

    print(format_summary(analyze(trace)))

Exports: format_summary, format_ns.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._analysis import Analysis, PathStep

__all__ = ["format_ns", "format_summary"]


def format_ns(ns: int) -> str:
    return f"{ns / 1e6:.1f} ms" if ns else "-"


def format_summary(a: Analysis) -> str:
    """The terminal report of ``summary``: plain text, no colour, stable for golden files."""
    req = a.request
    head = " ".join(str(x) for x in (req.get("method"), req.get("path"), req.get("status")) if x)
    lines = [
        f"{head or 'request'}  {format_ns(a.duration)}  trace {a.trace_id}",
        f"  the request's own code ran {format_ns(a.root_sync)} on the loop; "
        f"it waited {format_ns(max(0, a.duration - a.root_sync))}",
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
                f"  {format_ns(getattr(t, key)):>10}  {t.type} {t.label}  #{t.async_id}"
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
    return "\n".join(lines) + "\n"


def _what(step: PathStep) -> str:
    return step.label if step.type == "root" else f"{step.type} {step.label}"


def _path_lines(path: Sequence[PathStep]) -> list[str]:
    """The critical path, one line a step; a run of the same step (or pair or triple of steps)
    three or more times over, such as a query per row, one line a step of the run, counted."""
    key = [(s.depth, s.type, s.label) for s in path]
    lines = []
    i = 0
    while i < len(path):
        period, reps = 1, 1
        for p in (1, 2, 3):
            n = 1
            while key[i + n * p : i + (n + 1) * p] == key[i : i + p]:
                n += 1
            if n >= 3 and p * n > period * reps:
                period, reps = p, n
        if reps == 1:
            s = path[i]
            lines.append(
                f"  {format_ns(s.start):>10} → {format_ns(s.end):<10}{'  ' * s.depth}"
                f"{_what(s)}  #{s.async_id}"
            )
            i += 1
            continue
        run = path[i : i + period * reps]
        for j in range(period):
            first, last = run[j], run[j + period * (reps - 1)]
            when = (
                f"{format_ns(run[0].start):>10} → {format_ns(max(s.end for s in run)):<10}"
                if j == 0
                else " " * 23
            )
            count = f"{reps} x " if j == 0 else "then " if period > 1 else ""
            lines.append(
                f"  {when}{'  ' * first.depth}{count}{_what(first)}"
                f"  #{first.async_id} … #{last.async_id}"
            )
        i += period * reps
    return lines
