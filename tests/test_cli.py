from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import httpx
import orjson
import pytest

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


def test_a_file_that_cannot_be_read_is_named_with_what_is_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "none.json"
    assert main(["summary", str(missing)]) == 2
    assert capsys.readouterr().err == f"error: {missing}: No such file or directory\n"
    assert main(["extract", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path}: Is a directory\n"
    (tmp_path / "x.json").write_text('{"bad": 1}')
    assert main(["summary", str(tmp_path / "x.json")]) == 2
    assert "not a trace" in capsys.readouterr().err


def test_view_writes_the_viewer_with_the_trace_inside(tmp_path: Path) -> None:
    out = tmp_path / "view.html"
    golden = Path(__file__).parent / "golden" / "checkout.json"
    assert main(["view", str(golden), "-o", str(out), "--no-open"]) == 0
    page = out.read_text()
    assert '<script type="application/json" id="asynctrace-data">' in page
    assert "0123456789abcdef0123456789abcdef" in page and "sequential-awaits" in page


def test_convert_to_html_and_to_json_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    golden = Path(__file__).parent / "golden" / "checkout.json"
    assert main(["convert", str(golden), str(golden), "--to", "json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(
        load_trace(line).request["path"] == "/checkout" for line in lines
    )
    out = tmp_path / "t.html"
    assert main(["convert", str(golden), "--to", "html", "-o", str(out)]) == 0
    assert out.read_bytes().startswith(b"<!doctype html>")


def test_extract_reports_progress_through_a_large_log(tmp_path: Path) -> None:
    from asgi_asynctrace._logs import extract

    log = tmp_path / "big.log"
    trace = b'{"version":1,"resources":[],"requestDurationNs":1}'
    with log.open("wb") as f:
        for i in range(10_000):
            f.write(b"INFO noise line %d\n" % i)
            if i % 1000 == 0:
                f.write(b"INFO: AsyncTrace completed; toJson() = " + trace + b"\n")
    seen: list[tuple[int, int, int]] = []
    items = list(extract([str(log)], lambda name, done, size, n: seen.append((done, size, n))))
    assert len(items) == 10
    assert len(seen) >= 2 and seen[-1] == (log.stat().st_size, log.stat().st_size, 10)
    assert [s[0] for s in seen] == sorted(s[0] for s in seen)


def test_trace_sends_one_request_traced_and_prints_where_its_time_went(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from .servers import sample_app_process

    saved = tmp_path / "slow.json"
    with sample_app_process({"SAMPLE_DB": str(tmp_path / "cli.db")}) as (base, _):
        assert main(["trace", f"{base}/slow", "-o", str(saved)]) == 0
        out, err = capsys.readouterr()
        assert out.startswith("GET /slow 200 ") and "critical path" in out
        # the planted problems, found (their severity is their share of the request, which
        # moves with the machine: 31.7 ms of 130 ms is "medium" in a just-started process)
        assert "] blocked-loop: GET /slow ran " in out and "] n-plus-one: 20 x db-query" in out
        assert f"GET {base}/slow -> 200 in " in err
        trace = load_trace(saved.read_bytes())  # the whole trace, from the store
        assert trace.request["path"] == "/slow" and trace.root.state == "ok"
        assert trace.trace_id in out.splitlines()[0]
        assert f"in the viewer: {base}/__asynctrace/?id={trace.trace_id}" in err
        # the store's own pages are never traced: no trace id comes back, and it says why
        assert main(["trace", f"{base}/__asynctrace/traces"]) == 2
        assert "no X-Async-Trace-Id" in capsys.readouterr().err
        assert main(["trace", "-H", "no colon", f"{base}/"]) == 2
        assert "-H wants 'Name: value'" in capsys.readouterr().err
        # a body and headers go with the request (a POST to the index page, which Starlette
        # answers 405, traced all the same)
        code = main(["trace", "-X", "POST", "-H", "X-Mine: 1", "-d", "{}", "--json", f"{base}/"])
        out = capsys.readouterr().out
        assert code == 0 and orjson.loads(out)["request"]["method"] == "POST"
        body = tmp_path / "body.bin"
        body.write_bytes(b"x" * 70_000)
        assert main(["trace", "-X", "POST", "-d", f"@{body}", "-o", str(saved), f"{base}/"]) == 0
        assert "-> 405 in " in capsys.readouterr().err  # (the index reads no body: GET only)
        assert load_trace(saved.read_bytes()).request["method"] == "POST"
        # -n: the same request several times, their figures and the slowest against a
        # typical one; -o writes them all, as JSON lines
        several = tmp_path / "items.jsonl"
        assert main(["trace", "-n", "5", f"{base}/items", "-o", str(several)]) == 0
        out, err = capsys.readouterr()
        assert out.startswith("5 trace(s), 1 route(s), the slowest (95th percentile) first\n")
        assert "\nGET /items  (5 traces)\n" in out and "what held it up (critical path)" in out
        traces = [load_trace(line) for line in several.read_bytes().splitlines()]
        assert len(traces) == 5 and {t.request["path"] for t in traces} == {"/items"}
        slowest = max(traces, key=lambda t: t.duration_ns)
        assert (
            f"\nGET /items: {slowest.duration_ns / 1e6:.1f} ms (trace {slowest.trace_id[:12]})"
            in out
        )
        assert f"GET {base}/items: 5 requests, answered 5 x 200" in err
        assert f"the slowest in the viewer: {base}/__asynctrace/?id={slowest.trace_id}" in err
        assert main(["trace", "-n", "3", "--json", f"{base}/items"]) == 0
        doc = orjson.loads(capsys.readouterr().out)
        assert doc["routes"][0]["traces"] == 3
        assert doc["comparison"]["slower"]["traceId"] == doc["routes"][0]["slowestTraceId"]
        assert main(["trace", "-n", "0", f"{base}/items"]) == 2
        assert "-n wants 1 or more requests, got 0" in capsys.readouterr().err
        # -c: that many at a time, each client on its own connection (the route run once
        # before: its first request in the process makes the app's upstream client, which
        # holds the loop long enough for the others to queue behind it)
        assert httpx.get(f"{base}/parallel").status_code == 200
        assert main(["trace", "-n", "6", "-c", "3", "-o", str(several), f"{base}/parallel"]) == 0
        out, err = capsys.readouterr()
        assert f"GET {base}/parallel: 6 requests, answered 6 x 200" in err
        assert out.startswith("6 trace(s), 1 route(s)") and "\nGET /parallel: " in out
        ids = [load_trace(line).trace_id for line in several.read_bytes().splitlines()]
        assert len(set(ids)) == 6
        spans = sorted((t.started_at_unix_ns, t.started_at_unix_ns + t.duration_ns)
                       for t in map(load_trace, several.read_bytes().splitlines()))  # fmt: skip
        # some request began before an earlier one had ended (one at a time, none would; on a
        # loaded machine the first two may not overlap, so any of them)
        ends = [max(end for _, end in spans[: i + 1]) for i in range(len(spans) - 1)]
        assert any(start < end for (start, _), end in zip(spans[1:], ends, strict=True))
        assert main(["trace", "-n", "2", "-c", "0", f"{base}/items"]) == 2
        assert "-c wants 1 or more at once, got 0" in capsys.readouterr().err
        assert main(["trace", "-d", f"@{tmp_path / 'none'}", f"{base}/"]) == 2
        assert "No such file" in capsys.readouterr().err


def test_trace_falls_back_to_the_inline_trace_when_the_app_keeps_no_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from .servers import app_process

    env = {"WORKERS_STORE_SIZE": "0"}
    saved = tmp_path / "inline.json"
    with app_process(["uvicorn", "tests.workers_app:app"], env) as (base, _):
        assert main(["trace", f"{base}/pid", "-o", str(saved)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("GET /pid 200 ")
    assert "the trace from the response header, which ends where the response started" in err
    assert load_trace(saved.read_bytes()).root.state == "pending"  # the response had not ended


def test_trace_says_what_is_wrong_with_the_url(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", "ftp://example.com/x"]) == 2
    assert "not an http(s) URL: 'ftp://example.com/x'" in capsys.readouterr().err
    from .servers import free_port

    assert main(["trace", f"http://127.0.0.1:{free_port()}/x", "--timeout", "5"]) == 2
    assert "error: GET http://127.0.0.1:" in capsys.readouterr().err


def test_trace_finds_the_trace_in_the_worker_that_served_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Two workers, no shared store_dir: the trace is asked for over the request's own
    # keep-alive connection, so the worker that has it answers.
    from .servers import app_process

    command = ["uvicorn", "tests.workers_app:app", "--workers", "2", "--log-level", "warning"]
    with app_process(command, {}) as (base, _):
        for _ in range(6):
            assert main(["trace", f"{base}/pid"]) == 0
            assert f"in the viewer: {base}/__asynctrace/?id=" in capsys.readouterr().err


def test_trace_with_the_apps_secret(capsys: pytest.CaptureFixture[str]) -> None:
    from .servers import app_process

    env = {"WORKERS_SECRET": "s3cret"}
    with app_process(["uvicorn", "tests.workers_app:app"], env) as (base, _):
        assert main(["trace", f"{base}/pid"]) == 2  # "1" is not the secret: not traced
        assert "no X-Async-Trace-Id" in capsys.readouterr().err
        assert main(["trace", "--secret", "s3cret", f"{base}/pid"]) == 0  # the store too
        out, err = capsys.readouterr()
        assert out.startswith("GET /pid 200 ") and "in the viewer: " in err


def test_status_says_how_a_running_apps_tracer_is_set_and_what_it_has_done(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from .servers import app_process

    env = {"WORKERS_SECRET": "s3cret"}
    with app_process(["uvicorn", "tests.workers_app:app"], env) as (base, _):
        assert main(["status", base]) == 2  # "1" is not the secret: the status is not ours
        assert "may this client read it (from loopback, or with the app's --secret)?" in (
            capsys.readouterr().err
        )
        assert main(["status", "--secret", "s3cret", base]) == 0
        before = capsys.readouterr().out
        assert main(["trace", "--secret", "s3cret", f"{base}/pid"]) == 0
        capsys.readouterr()
        assert main(["status", "--secret", "s3cret", base]) == 0
        after = capsys.readouterr().out
        assert main(["status", "--secret", "s3cret", "--json", base]) == 0
        doc = orjson.loads(capsys.readouterr().out)
    assert before.startswith(f"asgi-asynctrace {doc['version']} at {base}/__asynctrace: ")
    assert "asyncio hooks     not on yet (no request traced so far)" in before
    assert "who is traced     requests with X-Async-Trace set to the app's secret" in after
    assert "the store         1 trace(s) of the last 100, this process's own" in after
    assert "asyncio hooks     on for " in after
    assert "tracer failures   none" in after
    assert doc["middleware"]["access"] == "secret" and b"s3cret" not in orjson.dumps(doc)
    assert doc["middleware"]["headerLimit"] == "what keeps the headers within 4096 bytes"
    assert doc["store"] == {"traces": 1, "keeps": 100, "sharedDirectory": False}
    assert doc["instrumentation"]["timers"] == "on" and doc["failures"] == {}


def test_status_names_sampling_the_shared_store_and_the_tracers_failures() -> None:
    from asgi_asynctrace._live import format_status

    text = format_status("http://app/__asynctrace", {
        "version": "1", "pid": 7, "python": "3.12.1",
        "loop": "asyncio.unix_events._UnixSelectorEventLoop", "accelerator": False,
        "hooksOnSeconds": 2.5,
        "store": {"traces": 40, "keeps": 100, "sharedDirectory": True},
        "middleware": {"access": "loopback", "sampleRate": 0.01, "maxSampledPerS": 5.0},
        "instrumentation": {"httpx": "on", "redis": "not installed", "aiohttp": "off"},
        "failures": {"serialize": 1, "task-factory": 3},
    })  # fmt: skip
    assert text.splitlines() == [
        "asgi-asynctrace 1 at http://app/__asynctrace: process 7, Python 3.12.1, "
        "asyncio.unix_events._UnixSelectorEventLoop, pure Python (no C accelerator)",
        "  who is traced     requests with X-Async-Trace from loopback clients (set a secret "
        "behind a proxy); 1 % of the others sampled (at most 5 a second)",
        "  the store         40 trace(s) of the last 100, all workers' (store_dir)",
        "  asyncio hooks     on for 2.5 s",
        "  instrumentation   on: httpx",
        "                    off: aiohttp",
        "                    library not installed: redis",
        "  tracer failures   3 x task-factory, 1 x serialize (each logged once, in the app's log)",
    ]
