"""The commands that talk to a running app: ``trace`` sends requests that ask to be traced and
reads their traces back from the app's store; ``watch`` prints each trace the store takes;
``status`` says how the tracer there is set and what it has done.

    asgi-asynctrace trace -n 20 -c 4 http://127.0.0.1:8000/items
    asgi-asynctrace watch http://127.0.0.1:8000 --route 'GET /items'
    asgi-asynctrace status http://127.0.0.1:8000

Each takes the parsed command line (``_cli`` makes the parser, and ``args.settings``).
Exports: trace_command, watch_command, status_command, format_status.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from ._analysis import Analysis, analyze
from ._load import TraceFormatError
from ._report import format_blocker, format_summary, format_watch_line
from ._select import Selection
from ._sinks import decode_trace_header

__all__ = ["format_status", "status_command", "trace_command", "watch_command"]


def trace_command(args: argparse.Namespace) -> int:
    """Send a request that asks to be traced (``-n``: that many, one after another), fetch
    each whole trace from the app's store, and print where the time went: one request's
    summary, or, for several, their figures and the slowest set against a typical one."""
    from urllib.parse import urlsplit

    import httpx

    from ._load import load_trace

    if args.repeat < 1:
        raise TraceFormatError(f"-n wants 1 or more requests, got {args.repeat}")
    headers = []
    for line in args.header:
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise TraceFormatError(f"-H wants 'Name: value', got {line!r}")
        headers.append((name.strip(), value.strip()))
    url = urlsplit(args.url)
    if url.scheme not in ("http", "https") or not url.netloc:
        raise TraceFormatError(f"not an http(s) URL: {args.url!r}")
    body: bytes | None = None
    if args.data is not None:  # as curl's -d: @file for a file's bytes, - for stdin's
        if args.data == "@-":
            body = sys.stdin.buffer.read()
        elif args.data.startswith("@"):
            body = Path(args.data[1:]).read_bytes()
        else:
            body = args.data.encode()
    viewer = f"{url.scheme}://{url.netloc}{args.prefix}/"
    if args.concurrency < 1:
        raise TraceFormatError(f"-c wants 1 or more at once, got {args.concurrency}")
    got: list[Answered] = []
    left = iter(range(args.repeat))

    def client_loop(client: Any) -> None:
        # one connection per client, as a load generator's; its request's trace is asked for
        # over it, so under several worker processes the one that served it answers
        for _ in left:  # (next() on a range iterator, and append(), are atomic under the GIL)
            got.append(_traced_request(client, args, viewer, headers, body))

    # every client made before the first request goes out (making one takes milliseconds),
    # so that the first C requests are in flight together
    clients = [httpx.Client(timeout=args.timeout, verify=not args.insecure)
               for _ in range(min(args.concurrency, args.repeat))]  # fmt: skip
    try:
        if len(clients) == 1:
            client_loop(clients[0])
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(len(clients)) as pool:
                for done in [pool.submit(client_loop, c) for c in clients]:
                    done.result()  # the first error, as one client would have raised it
        if len(got) == 1:
            data, stored, _status = got[0]
            trace = load_trace(orjson.loads(data))
            if stored:
                print(f"in the viewer: {viewer}?id={trace.trace_id}", file=sys.stderr)
            if args.output is not None:
                args.output.write_bytes(data)
                print(f"wrote {args.output}", file=sys.stderr)
            analysis = analyze(trace, args.settings)
            if stored:
                analysis = _blockers_from(clients[0], args, viewer, analysis)
            if args.json:
                sys.stdout.buffer.write(orjson.dumps(analysis.to_dict()) + b"\n")
            else:
                sys.stdout.write(format_summary(analysis))
            return 0
    finally:
        for client in clients:
            client.close()
    return _several(args, got, viewer)


def _blockers_from(
    client: Any, args: argparse.Namespace, viewer: str, analysis: Analysis
) -> Analysis:
    """``analysis`` with its loop-busy finding naming the requests that held the loop, as the
    app's store says (only the process that served the request knows them: asked over the
    same connection, which under several workers reaches it). Unchanged when there is no
    such finding or the store names none."""
    import dataclasses

    from ._findings import Blocker

    if not any(f.kind == "loop-busy" for f in analysis.findings):
        return analysis
    try:
        got = client.get(f"{viewer}traces/{analysis.trace_id}?analysis=1",
                         headers={"X-Async-Trace": args.secret or "1"})  # fmt: skip
        theirs = [f for f in got.json()["analysis"]["findings"] if f["kind"] == "loop-busy"]
        named = tuple(Blocker.from_dict(b) for f in theirs for b in f.get("blockers", ()))
    except Exception:  # an older app, another worker: the finding as it was
        return analysis
    findings = [dataclasses.replace(f, blockers=named) if f.kind == "loop-busy" else f
                for f in analysis.findings]  # fmt: skip
    return dataclasses.replace(analysis, findings=findings)


# one request sent traced: its trace's JSON, whether the store had it, the response's status
Answered = tuple[bytes, bool, int]


def _traced_request(client: Any, args: argparse.Namespace, viewer: str,
                    headers: list[tuple[str, str]], body: bytes | None) -> Answered:  # fmt: skip
    """One request sent traced: its trace's JSON (from the store, else from the response
    header), whether the store had it, and the response's status."""
    import time

    import httpx

    ask = {"X-Async-Trace": args.secret or "1"}
    try:
        sent = client.request(args.method, args.url, content=body, headers=[*headers, *ask.items()])
    except httpx.HTTPError as exc:
        raise OSError(f"{args.method} {args.url}: {exc}") from None
    if args.repeat == 1:
        print(f"{args.method} {args.url} -> {sent.status_code} "
              f"in {sent.elapsed.total_seconds() * 1e3:.1f} ms", file=sys.stderr)  # fmt: skip
    trace_id = sent.headers.get("x-async-trace-id")
    if not trace_id:
        raise TraceFormatError(
            "the response has no X-Async-Trace-Id: is AsyncTraceMiddleware on this app, and "
            "may this client trace (from loopback, or with the app's --secret)? "
            f"`asgi-asynctrace status {viewer.rstrip('/')}` says how its tracer is set"
        )
    store = f"{viewer}traces/{trace_id}"
    deadline = time.monotonic() + 3  # stored once the response has gone out
    while True:
        # the same client, so the request's keep-alive connection: under several worker
        # processes the worker that served the request, and holds its trace, answers
        got = client.get(store, headers=ask)
        if got.status_code == 200:
            return got.content, True, sent.status_code
        if time.monotonic() > deadline or got.status_code != 404:
            break
        time.sleep(0.05)
    inline = sent.headers.get("x-async-trace-data", "")
    if not inline.startswith("z1:"):
        raise TraceFormatError(
            f"trace {trace_id} is not in the store at {store} ({got.status_code}) and the "
            "response carried none inline"
        )
    print(f"not in the store at {store} ({got.status_code}: {got.text[:300]}): the trace "
          "from the response header, which ends where the response started",
          file=sys.stderr)  # fmt: skip
    return orjson.dumps(decode_trace_header(inline)), False, sent.status_code


def _several(args: argparse.Namespace, got: list[Answered], viewer: str) -> int:
    """``trace -n N``: the requests' figures, as ``routes`` gives them, and the slowest set
    against a typical one, as ``compare`` does."""
    from ._compare import typical_and_slowest
    from ._load import load_trace
    from ._report import format_comparison, format_routes
    from ._routes import by_route, route_input

    statuses = Counter(status for _, _, status in got)
    answers = ", ".join(f"{n} x {code}" for code, n in sorted(statuses.items()))
    print(f"{args.method} {args.url}: {len(got)} requests, answered {answers}", file=sys.stderr)
    traces = [load_trace(orjson.loads(data)) for data, _, _ in got]
    if args.output is not None:  # JSON lines, as extract writes: every command reads them
        args.output.write_bytes(b"".join(data + b"\n" for data, _, _ in got))
        print(f"wrote {len(got)} traces to {args.output}", file=sys.stderr)
    analyses = [analyze(t, args.settings) for t in traces]
    inputs = [route_input(t, a) for t, a in zip(traces, analyses, strict=True)]
    routes = by_route(inputs)
    comparison = typical_and_slowest(inputs)
    slowest = max(range(len(traces)), key=lambda i: traces[i].duration_ns)
    if got[slowest][1]:
        print(f"the slowest in the viewer: {viewer}?id={traces[slowest].trace_id}",
              file=sys.stderr)  # fmt: skip
    if args.json:
        doc = {"routes": [r.to_dict() for r in routes],
               "comparison": comparison.to_dict() if comparison else None}  # fmt: skip
        sys.stdout.buffer.write(orjson.dumps(doc) + b"\n")
        return 0
    sys.stdout.write(format_routes(routes))
    if comparison is not None:
        sys.stdout.write("\n" + format_comparison(comparison))
    if got[slowest][1]:
        sys.stdout.write(_held_up(args, viewer, analyses[slowest]))
    return 0


def _held_up(args: argparse.Namespace, viewer: str, analysis: Analysis) -> str:
    """For the slowest of ``trace -n``, when the loop was busy elsewhere while it waited: the
    requests whose steps held the loop then, as the app's store names them ("" for none)."""
    import httpx

    if not any(f.kind == "loop-busy" for f in analysis.findings):
        return ""
    with httpx.Client(timeout=args.timeout, verify=not args.insecure) as client:
        named = _blockers_from(client, args, viewer, analysis)
    lines = [f"  {format_blocker(b)}" for f in named.findings for b in f.blockers]
    if not lines:
        return ""
    head = "\nthe slowest waited for the loop while other requests held it:\n"
    return head + "\n".join(lines) + "\n"


def watch_command(args: argparse.Namespace) -> int:
    """Each trace a running app stores from now on, as one line: when, the request, how long,
    what held it up, its worst finding, its id. Until interrupted, or --count traces."""
    import time

    from ._logs import StoreReader
    from ._routes import held_up_by, own_steps

    if args.interval <= 0:
        raise TraceFormatError(f"--interval wants seconds > 0, got {args.interval:g}")
    selection = Selection.from_args(args)
    settings = args.settings
    shown = 0
    with StoreReader(args.app, args.secret) as store:
        seen = set(store.ids())  # what was there before: not news
        print(f"watching {store.base} (every {args.interval:g} s; Ctrl-C to stop)",
              file=sys.stderr, flush=True)  # fmt: skip
        away: str | None = None  # why the app does not answer, while it does not
        try:
            while args.count is None or shown < args.count:
                time.sleep(args.interval)
                try:  # an app restarting (uvicorn --reload) is waited for, not an error
                    ids = store.ids()
                except (OSError, TraceFormatError) as exc:
                    if away is None:
                        print(f"waiting for the app: {exc}", file=sys.stderr, flush=True)
                    away = str(exc)
                    continue
                if away is not None:
                    print(f"the app answers again: {store.base}", file=sys.stderr, flush=True)
                    away = None
                for trace_id in reversed(ids):  # the oldest news first
                    if trace_id in seen:
                        continue
                    seen.add(trace_id)
                    try:
                        found = store.trace(trace_id)
                    except (OSError, TraceFormatError):
                        continue  # gone with the app: the next look says so
                    if found is None or not selection.keeps(found[1]):
                        continue
                    trace = found[1]
                    analysis = analyze(trace, settings)
                    held = held_up_by(analysis, own_steps(trace))
                    print(format_watch_line(trace, analysis, held), flush=True)
                    shown += 1
                    if args.count is not None and shown >= args.count:
                        break
                seen.intersection_update(ids)  # what left the store need not be remembered
        except KeyboardInterrupt:
            pass
    return 0


def status_command(args: argparse.Namespace) -> int:
    """How the tracer of a running app is set, and what it has done: the first thing to look
    at when a request that asked for a trace got none, or a trace lacks a library's calls."""
    from ._logs import StoreReader

    with StoreReader(args.app, args.secret) as store:
        status = store.status()
        where = store.base
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(status) + b"\n")
    else:
        sys.stdout.write(format_status(where, status))
    return 0


def format_status(where: str, s: dict[str, Any]) -> str:
    """``status`` as text: a head line, then one line a subject."""
    m, store = s.get("middleware", {}), s.get("store", {})
    built = "the C accelerator" if s.get("accelerator") else "pure Python (no C accelerator)"
    lines = [f"asgi-asynctrace {s.get('version')} at {where}: process {s.get('pid')}, "
             f"Python {s.get('python')}, {s.get('loop')}, {built}"]  # fmt: skip
    who = "requests with X-Async-Trace " + (
        "set to the app's secret" if m.get("access") == "secret"
        else "from loopback clients (set a secret behind a proxy)"
    )  # fmt: skip
    rate = m.get("sampleRate") or 0
    if rate:
        cap = m.get("maxSampledPerS")
        who += f"; {rate * 100:g} % of the others sampled"
        who += f" (at most {cap:g} a second)" if cap else ""
    lines.append(f"  {'who is traced':<18}{who}")
    shared = ("all workers' (store_dir)" if store.get("sharedDirectory")
              else "this process's own (workers share none without store_dir)")  # fmt: skip
    lines.append(f"  {'the store':<18}{store.get('traces')} trace(s) of the last "
                 f"{store.get('keeps')}, {shared}")  # fmt: skip
    hooks = s.get("hooksOnSeconds")
    on = f"on for {hooks} s" if hooks else "not on yet (no request traced so far)"
    lines.append(f"  {'asyncio hooks':<18}{on}")
    by_state: dict[str, list[str]] = {}
    for name, state in sorted(s.get("instrumentation", {}).items()):
        by_state.setdefault(state, []).append(name)
    label = "instrumentation"
    for state, wording in (("on", "on"), ("waiting for import", "on once the app imports it"),
                           ("off", "off"), ("not installed", "library not installed")):  # fmt: skip
        if state in by_state:
            lines.append(f"  {label:<18}{wording}: {', '.join(by_state[state])}")
            label = ""
    failures = sorted((s.get("failures") or {}).items(), key=lambda f: -f[1])
    told = ", ".join(f"{n} x {place}" for place, n in failures)
    said = f"{told} (each logged once, in the app's log)" if failures else "none"
    lines.append(f"  {'tracer failures':<18}{said}")
    return "\n".join(lines) + "\n"
