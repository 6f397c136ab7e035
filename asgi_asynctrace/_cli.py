"""The command line: pull traces out of logs, decode an inline header.

    asgi-asynctrace extract server.log > traces.jsonl
    asgi-asynctrace extract -o traces/ server.log.gz other.log
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="asgi-asynctrace", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    ex = commands.add_parser("extract", help="pull 'AsyncTrace completed' lines out of logs")
    ex.add_argument("logs", nargs="*", help="log files (plain or gzip); none or - for stdin")
    ex.add_argument("-o", "--output", type=Path, help="write one <traceId>.json per trace here")
    ex.set_defaults(run=_extract_command)
    de = commands.add_parser("decode-header", help="print the trace in an X-Async-Trace-Data value")
    de.add_argument("value")
    de.set_defaults(run=_decode_command)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
