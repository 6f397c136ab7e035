"""The terminal report of ``asgi-asynctrace summary``: plain text, stable for golden files.

    print(format_summary(analyze(trace)))

Exports: format_summary, format_ns.
"""

from __future__ import annotations

from ._analysis import Analysis

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
    lines += ["", "  critical path (what the request was waiting for, in order)"]
    if not a.critical_path:
        lines.append("    nothing: the request never waited on anything it started")
    for step in a.critical_path:
        lines.append(
            f"  {format_ns(step.start):>10} → {format_ns(step.end):<10}{'  ' * step.depth}"
            f"{step.type} {step.label}  #{step.async_id}"
        )
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
