"""The command line: pull traces out of logs, say where a request's time went, decode a header.

    asgi-asynctrace extract server.log > traces.jsonl
    asgi-asynctrace extract -o traces/ server.log.gz other.log
    asgi-asynctrace summary trace.json             # breakdown, top waits, critical path, findings
    asgi-asynctrace diagnose traces.jsonl --fail-on medium     # for CI: exit 1 on a finding
    asgi-asynctrace decode-header 'z1:eJzt…'

Exports: main.
"""

from __future__ import annotations

import argparse
import gzip
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import orjson

from ._analysis import SEVERITIES, Analysis, AnalysisSettings, analyze
from ._load import TraceFormatError, load_trace
from ._model import Trace
from ._sinks import LOG_PREFIX, decode_trace_header

__all__ = ["main"]

_PREFIX = LOG_PREFIX.encode()


def _open(name: str) -> BinaryIO:
    if name == "-":
        return sys.stdin.buffer
    stream = open(name, "rb")  # noqa: SIM115 - closed by the caller
    if stream.peek(2)[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=stream)  # type: ignore[return-value]
    return stream


def extract(names: Sequence[str]) -> Iterator[tuple[str, int, bytes | str]]:
    """(source, line number, trace JSON bytes or an error message) for each trace line."""
    for name in names:
        stream = _open(name)
        try:
            for number, line in enumerate(stream, 1):
                at = line.find(_PREFIX)
                if at < 0:
                    continue
                data = line[at + len(_PREFIX) :].rstrip()
                try:
                    doc = orjson.loads(data)
                except orjson.JSONDecodeError as exc:
                    yield name, number, f"malformed or cut trace ({exc})"
                    continue
                if not isinstance(doc, dict) or "resources" not in doc:
                    yield name, number, "not a trace object"
                    continue
                yield name, number, data
        finally:
            if stream is not sys.stdin.buffer:
                stream.close()


def _extract_command(args: argparse.Namespace) -> int:
    out_dir: Path | None = args.output
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    found = bad = 0
    for name, number, item in extract(args.logs or ["-"]):
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


def _decode_command(args: argparse.Namespace) -> int:
    try:
        doc = decode_trace_header(args.value)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.buffer.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    return 0


def read_traces(name: str) -> Iterator[tuple[str, Trace]]:
    """Every trace in a file: one JSON trace, JSON lines (``extract``'s output), or a log.

    Yields (where, trace); raises TraceFormatError naming the file and line of a bad one.
    """
    stream = _open(name)
    try:
        data = stream.read()
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    text = data.lstrip()
    if not text:
        raise TraceFormatError(f"{name}: empty, no trace in it")
    if text.startswith(b"{"):
        try:
            yield name, load_trace(orjson.loads(text))
            return
        except orjson.JSONDecodeError:
            pass  # not one JSON document: JSON lines or a log, below
        except TraceFormatError as exc:
            raise TraceFormatError(f"{name}: {exc}") from None
    found = 0
    for number, line in enumerate(data.splitlines(), 1):
        at = line.find(_PREFIX)
        body = line[at + len(_PREFIX) :] if at >= 0 else line.strip()
        if not body.startswith(b"{"):
            continue
        try:
            trace = load_trace(orjson.loads(body))
        except (orjson.JSONDecodeError, TraceFormatError) as exc:
            raise TraceFormatError(f"{name}:{number}: {exc}") from None
        found += 1
        yield f"{name}:{number}", trace
    if not found:
        raise TraceFormatError(f"{name}: no trace found (expected trace JSON, JSON lines or a log)")


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.1f} ms" if ns else "-"


def format_summary(a: Analysis) -> str:
    """The terminal report of ``summary``: plain text, no colour, stable for golden files."""
    req = a.request
    head = " ".join(str(x) for x in (req.get("method"), req.get("path"), req.get("status")) if x)
    lines = [
        f"{head or 'request'}  {_ms(a.duration)}  trace {a.trace_id}",
        f"  the request's own code ran {_ms(a.root_sync)} on the loop; "
        f"it waited {_ms(max(0, a.duration - a.root_sync))}",
        "",
        f"  {'type':<14}{'count':>6}{'sync':>12}{'wait':>12}",
    ]
    for rtype, row in a.by_type.items():
        lines.append(f"  {rtype:<14}{row['count']:>6}{_ms(row['sync']):>12}{_ms(row['wait']):>12}")
    for key, title in (("wait", "longest waits"), ("sync", "most time running")):
        rows = [t for t in a.top(key) if getattr(t, key) > 0]
        if rows:
            lines += ["", f"  {title}"]
            lines += [
                f"  {_ms(getattr(t, key)):>10}  {t.type} {t.label}  #{t.async_id}" for t in rows
            ]
    lines += ["", "  critical path (what the request was waiting for, in order)"]
    if not a.critical_path:
        lines.append("    nothing: the request never waited on anything it started")
    for step in a.critical_path:
        lines.append(
            f"  {_ms(step.start):>10} → {_ms(step.end):<10}{'  ' * step.depth}"
            f"{step.type} {step.label}  #{step.async_id}"
        )
    lines += ["", "  findings"]
    if not a.findings:
        lines.append("    none: nothing held this request up beyond its own work")
    for f in a.findings:
        lines.append(f"    [{f.severity}] {f.kind}: {f.title}")
        if f.cost_ns:
            lines.append(f"        costs {_ms(f.cost_ns)}")
        lines.append(f"        fix: {f.fix}")
        if f.site:
            lines.append(f"        at {f.site}")
    return "\n".join(lines) + "\n"


def _settings(args: argparse.Namespace) -> AnalysisSettings:
    return AnalysisSettings(blocked_step_ms=args.blocked_ms)


def _summary_command(args: argparse.Namespace) -> int:
    out = sys.stdout
    first = True
    for name in args.traces:
        for _where, trace in read_traces(name):
            analysis = analyze(trace, _settings(args))
            if args.json:
                sys.stdout.buffer.write(orjson.dumps(analysis.to_dict()) + b"\n")
                continue
            if not first:
                out.write("\n")
            first = False
            out.write(format_summary(analysis))
    return 0


def _diagnose_command(args: argparse.Namespace) -> int:
    threshold = SEVERITIES.index(args.fail_on) if args.fail_on else None
    failing = 0
    for name in args.traces:
        for where, trace in read_traces(name):
            analysis = analyze(trace, _settings(args))
            req = analysis.request
            head = f"{req.get('method', '')} {req.get('path', '')}".strip()
            if args.json:
                doc = {"source": where, **analysis.to_dict()}
                sys.stdout.buffer.write(orjson.dumps(doc) + b"\n")
            else:
                print(f"{where}: {head} {_ms(analysis.duration)}: "
                      f"{len(analysis.findings) or 'no'} finding(s)")  # fmt: skip
                for f in analysis.findings:
                    cost = f" ({_ms(f.cost_ns)})" if f.cost_ns else ""
                    print(f"  [{f.severity}] {f.kind}{cost}: {f.title}")
                    print(f"      fix: {f.fix}")
            if threshold is not None:
                failing += sum(SEVERITIES.index(f.severity) >= threshold for f in analysis.findings)
    if threshold is not None and failing:
        print(f"{failing} finding(s) at or above {args.fail_on}", file=sys.stderr)
        return 1
    return 0


def _convert_command(args: argparse.Namespace) -> int:
    traces = [trace for name in args.traces for _, trace in read_traces(name)]
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="asgi-asynctrace", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    ex = commands.add_parser("extract", help="pull 'AsyncTrace completed' lines out of logs")
    ex.add_argument("logs", nargs="*", help="log files (plain or gzip); none or - for stdin")
    ex.add_argument("-o", "--output", type=Path, help="write one <traceId>.json per trace here")
    ex.set_defaults(run=_extract_command)
    formatter = argparse.RawDescriptionHelpFormatter
    su = commands.add_parser(
        "summary",
        help="where one request's time went: by type, top waits, critical path, findings",
        description="Example:\n  asgi-asynctrace summary trace.json\n"
        "  asgi-asynctrace extract server.log | asgi-asynctrace summary -\n\n"
        "TRACE is a trace's JSON, JSON lines from `extract`, or a log holding trace lines.",
        formatter_class=formatter,
    )
    su.add_argument("traces", nargs="+", metavar="TRACE", help="file (plain or gzip) or -")
    su.add_argument("--json", action="store_true", help="the analysis as JSON, one per trace")
    su.add_argument("--blocked-ms", type=float, default=20.0, help="a loop step this long blocks")
    su.set_defaults(run=_summary_command)
    di = commands.add_parser(
        "diagnose",
        help="the findings of each trace, ranked; --fail-on for CI",
        description="Example:\n  asgi-asynctrace diagnose traces/*.json --fail-on medium\n\n"
        "Exit status 1 when a finding at or above --fail-on is found.",
        formatter_class=formatter,
    )
    di.add_argument("traces", nargs="+", metavar="TRACE", help="file (plain or gzip) or -")
    di.add_argument("--fail-on", choices=SEVERITIES, help="exit 1 on findings this severe")
    di.add_argument("--json", action="store_true", help="one JSON object per trace")
    di.add_argument("--blocked-ms", type=float, default=20.0, help="a loop step this long blocks")
    di.set_defaults(run=_diagnose_command)
    co = commands.add_parser(
        "convert",
        help="write traces as a Perfetto trace, the viewer's HTML, or format-v1 JSON lines",
        description="Examples:\n"
        "  asgi-asynctrace convert trace.json --to perfetto -o trace.pftrace   # ui.perfetto.dev\n"
        "  asgi-asynctrace convert server.log --to html -o traces.html\n"
        "  asgi-asynctrace convert sample-seed.json --to json     # the seed's format to v1",
        formatter_class=formatter,
    )
    co.add_argument("traces", nargs="+", metavar="TRACE", help="file (plain or gzip) or -")
    co.add_argument("--to", required=True, choices=("perfetto", "html", "json"))
    co.add_argument("-o", "--output", type=Path, help="output file (default: stdout)")
    co.set_defaults(run=_convert_command)
    de = commands.add_parser("decode-header", help="print the trace in an X-Async-Trace-Data value")
    de.add_argument("value")
    de.set_defaults(run=_decode_command)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except (OSError, TraceFormatError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
