"""The command line: pull traces out of logs, say where a request's time went, decode a header.

    asgi-asynctrace extract server.log > traces.jsonl
    asgi-asynctrace extract -o traces/ server.log.gz other.log
    asgi-asynctrace trace http://127.0.0.1:8000/slow   # one request traced, and its summary
    asgi-asynctrace summary trace.json             # breakdown, top waits, critical path, findings
    asgi-asynctrace diagnose traces.jsonl --fail-on medium     # for CI: exit 1 on a finding
    asgi-asynctrace routes server.log              # many traces: the slow routes, what held them
    asgi-asynctrace compare server.log --route 'GET /items'   # its slowest against a typical one
    asgi-asynctrace watch http://127.0.0.1:8000    # each new trace of a running app, a line each
    asgi-asynctrace status http://127.0.0.1:8000   # how its tracer is set, what it has done
    asgi-asynctrace view trace.json                # the viewer, as one HTML file
    asgi-asynctrace decode-header 'z1:eJzt…'

Exports: main.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from ._analysis import SEVERITIES, AnalysisSettings, analyze
from ._live import status_command, trace_command, watch_command
from ._load import TraceFormatError
from ._logs import extract, read_traces
from ._report import format_ns, format_summary
from ._select import Selection, add_selection
from ._sinks import decode_trace_header

__all__ = ["main"]


def _extract_command(args: argparse.Namespace) -> int:
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


def _join_command(args: argparse.Namespace) -> int:
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


def _view_command(args: argparse.Namespace) -> int:
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


def _decode_command(args: argparse.Namespace) -> int:
    try:
        doc = decode_trace_header(args.value)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.buffer.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    return 0


def _summary_command(args: argparse.Namespace) -> int:
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


def _routes_command(args: argparse.Namespace) -> int:
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


def _compare_command(args: argparse.Namespace) -> int:
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


def _diagnose_command(args: argparse.Namespace) -> int:
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


def _convert_command(args: argparse.Namespace) -> int:
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


def _command(
    commands: Any, name: str, run: Any, help: str, description: str, traces: bool = True,
    running_app: bool = False,
) -> argparse.ArgumentParser:  # fmt: skip
    """One subcommand: its help, its examples kept as written, and (usually) TRACE files, or
    (``running_app``) the address of a running app and its secret."""
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=help, description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    if traces:
        where = "file (plain or gzip), -, or an app's address (its store)"
        parser.add_argument("traces", nargs="+", metavar="TRACE", help=where)
        parser.add_argument("--secret", help="the app's secret, to read its store (default: 1, "
                                             "as from loopback)")  # fmt: skip
        add_selection(parser)
    if running_app:
        parser.add_argument("app", help="the app's address (or its store's, for another "
                                        "path_prefix)")  # fmt: skip
        parser.add_argument("--secret", help="the app's secret (default: 1, as from loopback)")
    parser.set_defaults(run=run)
    return parser


def _analysed_output(parser: argparse.ArgumentParser, json_help: str) -> None:
    """The options of a command that prints an analysis: --json, and the blocked-loop bar."""
    parser.add_argument("--json", action="store_true", help=json_help)
    parser.add_argument(
        "--blocked-ms", type=float, default=20.0, help="a loop step this long blocks"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="asgi-asynctrace",
        description=(__doc__ or "").split("\nExports:")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    ex = _command(
        commands,
        "extract",
        _extract_command,
        "pull 'AsyncTrace completed' lines out of logs",
        "Examples:\n"
        "  asgi-asynctrace extract server.log > traces.jsonl     # one trace per line\n"
        "  asgi-asynctrace extract -o traces/ app.log.gz -       # one <traceId>.json each\n"
        "  kubectl logs pod/api | asgi-asynctrace extract | asgi-asynctrace diagnose -\n\n"
        "Finds the marker behind any logger or uvicorn prefix; a cut or malformed line is\n"
        "reported with its line number and skipped (exit status 1 when any was).",
        traces=False,
    )
    ex.add_argument("logs", nargs="*", help="log files (plain or gzip); none or - for stdin")
    ex.add_argument("-o", "--output", type=Path, help="write one <traceId>.json per trace here")
    su = _command(
        commands,
        "summary",
        _summary_command,
        "where one request's time went: by type, top waits, critical path, findings",
        "Example:\n  asgi-asynctrace summary trace.json\n"
        "  asgi-asynctrace extract server.log | asgi-asynctrace summary -\n\n"
        "TRACE is a trace's JSON, JSON lines from `extract`, or a log holding trace lines.",
    )
    _analysed_output(su, "the analysis as JSON, one per trace")
    tr = _command(
        commands,
        "trace",
        trace_command,
        "send one request traced, and say where its time went",
        "Examples:\n  asgi-asynctrace trace http://127.0.0.1:8000/slow\n"
        "  asgi-asynctrace trace -n 20 http://127.0.0.1:8000/items   # sometimes slow: why?\n"
        "  asgi-asynctrace trace -n 100 -c 10 http://127.0.0.1:8000/items   # and under load?\n"
        "  asgi-asynctrace trace -X POST -H 'Content-Type: application/json' -d '{\"n\": 3}' \\\n"
        "      http://127.0.0.1:8000/orders -o trace.json\n\n"
        "Sends the request with X-Async-Trace (your --secret, if the app has one), reads the\n"
        "trace id from the response, fetches the whole trace from the app's store and prints\n"
        "the summary (with --json, the analysis). With -n N, sends it N times and prints\n"
        "their durations (median, 95th percentile, longest), what held them up, and the\n"
        "slowest set against a typical one, as compare does; -o then writes JSON lines.\n"
        "Exit status 2 when no trace came back.",
        traces=False,
    )
    tr.add_argument("url")
    tr.add_argument("-n", "--repeat", type=int, default=1, metavar="N",
                    help="send it N times, one after another: their figures, and the slowest "
                         "against a typical one")  # fmt: skip
    tr.add_argument("-c", "--concurrency", type=int, default=1, metavar="C",
                    help="with -n, C requests at a time (C clients, a connection each): what "
                         "holds a request up under load")  # fmt: skip
    tr.add_argument("-X", "--method", default="GET")
    tr.add_argument("-H", "--header", action="append", default=[], help="'Name: value'")
    tr.add_argument("-d", "--data", help="the request body (@file: a file's, @-: stdin's)")
    tr.add_argument("--secret", help="the app's secret (default: 1, as from loopback)")
    tr.add_argument("--prefix", default="/__asynctrace", help="the app's path_prefix")
    tr.add_argument("-o", "--output", type=Path, help="also save the trace's JSON here")
    _analysed_output(tr, "the analysis as JSON")
    tr.add_argument("--timeout", type=float, default=60.0, help="seconds for each HTTP call")
    tr.add_argument("-k", "--insecure", action="store_true", help="do not verify TLS")
    di = _command(
        commands,
        "diagnose",
        _diagnose_command,
        "the findings of each trace, ranked; --fail-on for CI",
        "Example:\n  asgi-asynctrace diagnose traces/*.json --fail-on medium\n\n"
        "Exit status 1 when a finding at or above --fail-on is found.",
    )
    di.add_argument("--fail-on", choices=SEVERITIES, help="exit 1 on findings this severe")
    _analysed_output(di, "one JSON object per trace")
    ro = _command(
        commands,
        "routes",
        _routes_command,
        "many traces by route: the slowest first, what held each up, its findings",
        "Examples:\n  asgi-asynctrace routes server.log          # a day's sampled traces\n"
        "  kubectl logs deploy/api | asgi-asynctrace routes -\n"
        "  asgi-asynctrace routes traces/*.json --json\n\n"
        "A route is the method and the path as its route's template (/orders/{order_id}),\n"
        "where the router matched parameters, else the path. For each: its traces' median,\n"
        "95th percentile and longest duration, what held them up (their critical paths, by\n"
        "what the request waited on: the operation, not the task that carried it; its own\n"
        "code; the rest), the findings and in how many traces, and the slowest trace's id.",
    )
    _analysed_output(ro, "one JSON object per route")
    wa = _command(
        commands,
        "watch",
        watch_command,
        "each trace a running app stores from now on, one line each",
        "Examples:\n  asgi-asynctrace watch http://127.0.0.1:8000\n"
        "  asgi-asynctrace watch http://127.0.0.1:8000 --min-ms 100   # only the slow ones\n\n"
        "Asks the app's store for new traces every --interval seconds and prints each as one\n"
        "line: when it started, the request, its duration, what held it up, its worst\n"
        "finding and its id (to open with summary, compare or the viewer's ?id=). An app\n"
        "that stops answering (restarting under --reload) is waited for.",
        traces=False,
        running_app=True,
    )
    wa.add_argument("--interval", type=float, default=1.0, help="seconds between looks")
    wa.add_argument("--count", type=int, help="stop after this many traces")
    wa.add_argument("--blocked-ms", type=float, default=20.0, help="a loop step this long blocks")
    add_selection(wa)
    st = _command(
        commands,
        "status",
        status_command,
        "how a running app's tracer is set, and what it has done",
        "Example:\n  asgi-asynctrace status http://127.0.0.1:8000\n\n"
        "Who may trace, the store, the asyncio hooks, each library's instrumentation (on, on\n"
        "once the app imports it, off, not installed) and the tracer's own failures, as the\n"
        "process that answers has them: where to look when a request got no trace, or a\n"
        "trace lacks a library's calls.",
        traces=False,
        running_app=True,
    )
    st.add_argument("--json", action="store_true", help="the status as the app gave it")
    cm = _command(
        commands,
        "compare",
        _compare_command,
        "two traces side by side: what the slower spent its extra time on",
        "Examples:\n"
        "  asgi-asynctrace compare server.log --route 'GET /items'   # slowest vs a typical one\n"
        "  asgi-asynctrace compare slow.json fast.json\n"
        "  asgi-asynctrace compare server.log --id 9fd8e311 --id f096a6e9\n\n"
        "Two traces are set side by side as they are; several of one route, its slowest\n"
        "against its median. Says where the difference went: the critical paths by what held\n"
        "them up, the operations by what they were (how many, how long), the largest\n"
        "differences first, and the findings only one of them has.",
    )
    _analysed_output(cm, "the comparison as JSON")
    co = _command(
        commands,
        "convert",
        _convert_command,
        "write traces as Perfetto, clinic bubbleprof data, the viewer's HTML, or JSON lines",
        "Examples:\n"
        "  asgi-asynctrace convert trace.json --to perfetto -o trace.pftrace   # ui.perfetto.dev\n"
        "  asgi-asynctrace convert server.log --to html -o traces.html\n"
        "  asgi-asynctrace convert traces.jsonl --to bubbleprof -o out/   # clinic bubbleprof\n"
        "  asgi-asynctrace convert sample-seed.json --to json     # the seed's format to v1",
    )
    co.add_argument("--to", required=True, choices=("perfetto", "bubbleprof", "html", "json"))
    co.add_argument("-o", "--output", type=Path, help="output file (default: stdout)")
    jo = _command(
        commands,
        "join",
        _join_command,
        "put the traces of one request across services together",
        "Example:\n  asgi-asynctrace join frontend.json backend.json -o whole.json\n"
        "  asgi-asynctrace extract */server.log | asgi-asynctrace join - | "
        "asgi-asynctrace view -\n\n"
        "A trace whose request names an upstream (X-Async-Trace-Parent, sent to the hosts in\n"
        "the middleware's propagate_to) goes under that upstream's fetch.",
    )
    jo.add_argument("-o", "--output", type=Path, help="output file (default: stdout)")
    vi = _command(
        commands,
        "view",
        _view_command,
        "open traces in the viewer (one self-contained HTML file)",
        "Example:\n  asgi-asynctrace view trace.json\n"
        "  asgi-asynctrace view server.log -o traces.html --no-open",
    )
    vi.add_argument("-o", "--output", type=Path, help="where to write it (default: a temp file)")
    vi.add_argument("--no-open", action="store_true", help="write the file, open no browser")
    de = _command(
        commands,
        "decode-header",
        _decode_command,
        "print the trace in an X-Async-Trace-Data value",
        "Example:\n  asgi-asynctrace decode-header \"$(curl -sI -H 'X-Async-Trace: 1' "
        "localhost:8000/ | sed -n 's/^x-async-trace-data: //p')\"",
        traces=False,
    )
    de.add_argument("value")
    args = parser.parse_args(argv)
    if "blocked_ms" in args:  # a command that analyses: its settings, once
        args.settings = AnalysisSettings(blocked_step_ms=args.blocked_ms)
    try:
        return int(args.run(args))
    except (OSError, TraceFormatError) as exc:
        print(f"error: {_said(exc)}", file=sys.stderr)
        return 2


def _said(exc: BaseException) -> str:
    """An error as one line: a file that cannot be read as ``path: what went wrong``, not
    Python's ``[Errno 2] No such file or directory: 'path'``."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)
