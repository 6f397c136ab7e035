from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import orjson

from asgi_asynctrace import Trace, load_trace
from asgi_asynctrace._cli import main
from asgi_asynctrace._sinks import LOG_PREFIX, encode_trace_header


def _trace_json(path: str) -> bytes:
    trace = Trace.start(request={"method": "GET", "path": path})
    trace.finish(trace.origin + 1000)
    return trace.to_json()


def test_extract_finds_traces_behind_any_prefix_in_plain_and_gzip_logs(tmp_path: Path) -> None:
    a, b = _trace_json("/a"), _trace_json("/b")
    plain = tmp_path / "server.log"
    plain.write_bytes(
        b"INFO:     Started server process\n"
        + b"INFO:asgi_asynctrace.trace:" + LOG_PREFIX.encode() + a + b"\n"
        + LOG_PREFIX.encode() + b'{"version": 1, "resour\n'
        + b"2026-11-25 12:00:00 unrelated line\n"
    )  # fmt: skip
    packed = tmp_path / "old.log.gz"
    packed.write_bytes(gzip.compress(LOG_PREFIX.encode() + b + b"\n"))
    out = tmp_path / "traces"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "asgi_asynctrace",
            "extract",
            "-o",
            str(out),
            str(plain),
            str(packed),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1  # one cut line was reported and skipped
    assert f"{plain}:3: skipped: malformed or cut trace" in result.stderr
    assert "extracted 2 trace(s), skipped 1 bad line(s)" in result.stderr
    paths = sorted(load_trace(p.read_bytes()).request["path"] for p in out.iterdir())
    assert paths == ["/a", "/b"]


def test_extract_writes_json_lines_to_stdout(tmp_path: Path, capsysbinary: object) -> None:
    log = tmp_path / "x.log"
    log.write_bytes(LOG_PREFIX.encode() + _trace_json("/x") + b"\n")
    assert main(["extract", str(log)]) == 0
    out = capsysbinary.readouterr().out  # type: ignore[attr-defined]
    assert [orjson.loads(line)["request"]["path"] for line in out.splitlines()] == ["/x"]


def test_decode_header_prints_the_trace_and_rejects_what_is_not_one(capsys: object) -> None:
    value = encode_trace_header(_trace_json("/h"))
    assert main(["decode-header", value]) == 0
    assert orjson.loads(capsys.readouterr().out)["request"]["path"] == "/h"  # type: ignore[attr-defined]
    assert main(["decode-header", "omitted: 9000 bytes > limit 8192"]) == 2
    assert "fetch it by its id" in capsys.readouterr().err  # type: ignore[attr-defined]
