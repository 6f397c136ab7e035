"""The commands that read traces already taken, from logs, trace files or an app's store.

    asgi-asynctrace extract server.log > traces.jsonl
    asgi-asynctrace summary trace.json
    asgi-asynctrace routes server.log

extract, summary, diagnose, routes, compare, convert, join, view and decode-header; _cli
parses their arguments and runs them, and _live has the ones that talk to a running app.

Exports: extract_command, summary_command, diagnose_command, routes_command, compare_command,
convert_command, join_command, view_command, decode_command.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from ._analysis import SEVERITIES, analyze
from ._load import TraceFormatError
from ._logs import extract, read_traces
from ._report import format_ns, format_summary
from ._select import Selection
from ._sinks import decode_trace_header

__all__ = [
    "compare_command",
    "convert_command",
    "decode_command",
    "diagnose_command",
    "extract_command",
    "join_command",
    "routes_command",
    "summary_command",
    "view_command",
]


def extract_command(args: argparse.Namespace) -> int:
    out_dir: Path | None = args.output
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    found = bad = 0
    progress = _progress_bar if sys.stderr.isatty() else None
    for name, number, item in extract(args.logs or ["-"], progress):
        if isinstance(item, str):
            bad += 1
            print(f"{name}:{number}: skipped: {item}", file=sys.stderr)
            continue
        found += 1
        if out_dir is None:
            sys.stdout.buffer.write(item + b"\n")
            continue
        trace_id = orjson.loads(item).get("traceId") or f"trace-{found}"
        safe = "".join(c for c in str(trace_id) if c.isalnum() or c in "-_")[:64]
        (out_dir / f"{safe or found}.json").write_bytes(item)
    print(f"extracted {found} trace(s), skipped {bad} bad line(s)", file=sys.stderr)
    return 0 if bad == 0 else 1


def _progress_bar(name: str, done: int, size: int, traces: int) -> None:
    """One self-overwriting line on a terminal: how far into the file, how many traces."""
    share = f"{100 * done // size:3d}%" if size else "   …"
    end = "\n" if size and done >= size else ""
    print(f"\r{name}: {share} read, {traces} trace(s)", end=end, file=sys.stderr, flush=True)


def _traces(args: argparse.Namespace) -> Iterator[tuple[str, Any]]:
    """(where, trace) for each trace in the command's files that its selection keeps."""
    read = (pair for name in args.traces for pair in read_traces(name, args.secret))
    return Selection.from_args(args).apply(read)


def join_command(args: argparse.Namespace) -> int:
    from ._join import join_traces

    traces = [trace for _, trace in _traces(args)]
    joined = join_traces(traces)
    data = b"".join(trace.to_json() + b"\n" for trace in joined)
    if args.output is None:
        sys.stdout.buffer.write(data)
    else:
        args.output.write_bytes(data)
    print(f"joined {len(traces)} trace(s) into {len(joined)}", file=sys.stderr)
    return 0


def view_command(args: argparse.Namespace) -> int:
    import tempfile
    import webbrowser

    from ._viewer import viewer_html

    traces = [trace for _, trace in _traces(args)]
    out: Path = args.output or Path(tempfile.mkdtemp(prefix="asynctrace-")) / "trace.html"
    out.write_bytes(viewer_html(traces))
    print(f"wrote {out} ({len(traces)} trace(s))", file=sys.stderr)
    if not args.no_open and not webbrowser.open(out.resolve().as_uri()):
        print("no browser found here: open that file in one", file=sys.stderr)
    return 0


def decode_command(args: argparse.Namespace) -> int:
    try:
        doc = decode_trace_header(args.value)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.buffer.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    return 0


def summary_command(args: argparse.Namespace) -> int:
    out = sys.stdout
    first = True
    for _where, trace in _traces(args):
        analysis = analyze(trace, args.settings)
        if args.json:
            sys.stdout.buffer.write(orjson.dumps(analysis.to_dict()) + b"\n")
            continue
        if not first:
            out.write("\n")
        first = False
        out.write(format_summary(analysis))
    return 0


def routes_command(args: argparse.Namespace) -> int:
    from ._report import format_routes
    from ._routes import by_route, route_input

    tty = sys.stderr.isatty()  # a day's log takes a while: say how far it is, on a terminal

    def analysed() -> Any:
        count = 0
        for _where, trace in _traces(args):
            yield route_input(trace, analyze(trace, args.settings))
            count += 1
            if tty and count % 100 == 0:
                print(f"\r{count} trace(s) analysed", end="", file=sys.stderr, flush=True)
        if tty and count >= 100:
            print(f"\r{count} trace(s) analysed", file=sys.stderr)

    routes = by_route(analysed())  # (a file without a trace is an error before this)
    if args.json:
        for r in routes:
            sys.stdout.buffer.write(orjson.dumps(r.to_dict()) + b"\n")
        return 0
    sys.stdout.write(format_routes(routes))
    slowest = routes[0].slowest[1]
    if slowest and "-" not in args.traces:  # the next step, from the same files
        files = " ".join(shlex.quote(name) for name in args.traces)
        sys.stdout.write(f"\nthe slowest route's slowest trace: asgi-asynctrace summary {files} "
                         f"--id {slowest[:12]}  (view: in the viewer)\n")  # fmt: skip
        if routes[0].count > 2:
            route = shlex.quote(f"{routes[0].method} {routes[0].route}")
            sys.stdout.write(f"against a typical one: asgi-asynctrace compare {files} "
                             f"--route {route}\n")  # fmt: skip
    return 0


def compare_command(args: argparse.Namespace) -> int:
    from ._compare import choose_pair, compare
    from ._report import format_comparison

    faster, slower, baseline = choose_pair([trace for _, trace in _traces(args)])
    settings = args.settings
    result = compare((analyze(faster, settings), faster), (analyze(slower, settings), slower),
                     baseline)  # fmt: skip
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(result.to_dict()) + b"\n")
    else:
        sys.stdout.write(format_comparison(result))
    return 0


def diagnose_command(args: argparse.Namespace) -> int:
    threshold = SEVERITIES.index(args.fail_on) if args.fail_on else None
    failing = 0
    for where, trace in _traces(args):
        analysis = analyze(trace, args.settings)
        req = analysis.request
        head = f"{req.get('method', '')} {req.get('path', '')}".strip()
        if args.json:
            doc = {"source": where, **analysis.to_dict()}
            sys.stdout.buffer.write(orjson.dumps(doc) + b"\n")
        else:
            print(f"{where}: {head} {format_ns(analysis.duration)}: "
                  f"{len(analysis.findings) or 'no'} finding(s)")  # fmt: skip
            for f in analysis.findings:
                cost = f" ({format_ns(f.cost_ns)})" if f.cost_ns else ""
                print(f"  [{f.severity}] {f.kind}{cost}: {f.title}")
                print(f"      fix: {f.fix}")
                if f.site:
                    print(f"      at {f.site}")
        if threshold is not None:
            failing += sum(SEVERITIES.index(f.severity) >= threshold for f in analysis.findings)
    if threshold is not None and failing:
        print(f"{failing} finding(s) at or above {args.fail_on}", file=sys.stderr)
        return 1
    return 0


def convert_command(args: argparse.Namespace) -> int:
    traces = [trace for _, trace in _traces(args)]
    if args.to == "bubbleprof":
        from ._bubbleprof import write_bubbleprof

        if args.output is None:
            raise TraceFormatError("--to bubbleprof writes a directory: give it with -o DIR")
        where = write_bubbleprof(traces, args.output)
        print(f"wrote {len(traces)} trace(s) to {where}; view it with:\n"
              f"  clinic bubbleprof --visualize-only {where}", file=sys.stderr)  # fmt: skip
        return 0
    if args.to == "perfetto":
        from ._perfetto import to_perfetto

        data = to_perfetto(*traces)
    elif args.to == "html":
        from ._viewer import viewer_html

        data = viewer_html(traces)
    else:
        data = b"".join(trace.to_json() + b"\n" for trace in traces)
    if args.output is None or str(args.output) == "-":
        sys.stdout.buffer.write(data)
    else:
        args.output.write_bytes(data)
        print(f"wrote {len(traces)} trace(s) to {args.output}", file=sys.stderr)
    return 0
