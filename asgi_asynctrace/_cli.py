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
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._analysis import SEVERITIES, AnalysisSettings
from ._commands import (
    compare_command,
    convert_command,
    decode_command,
    diagnose_command,
    extract_command,
    join_command,
    routes_command,
    summary_command,
    view_command,
)
from ._live import status_command, trace_command, watch_command
from ._load import TraceFormatError
from ._select import add_selection

__all__ = ["main"]


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
        extract_command,
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
        summary_command,
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
        diagnose_command,
        "the findings of each trace, ranked; --fail-on for CI",
        "Example:\n  asgi-asynctrace diagnose traces/*.json --fail-on medium\n\n"
        "Exit status 1 when a finding at or above --fail-on is found.",
    )
    di.add_argument("--fail-on", choices=SEVERITIES, help="exit 1 on findings this severe")
    _analysed_output(di, "one JSON object per trace")
    ro = _command(
        commands,
        "routes",
        routes_command,
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
        compare_command,
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
        convert_command,
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
        join_command,
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
        view_command,
        "open traces in the viewer (one self-contained HTML file)",
        "Example:\n  asgi-asynctrace view trace.json\n"
        "  asgi-asynctrace view server.log -o traces.html --no-open",
    )
    vi.add_argument("-o", "--output", type=Path, help="where to write it (default: a temp file)")
    vi.add_argument("--no-open", action="store_true", help="write the file, open no browser")
    de = _command(
        commands,
        "decode-header",
        decode_command,
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
