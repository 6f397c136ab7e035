"""End to end: uvicorn on loopback under wrk, the sample app bare vs with the middleware.

    python -m benchmarks.bench_e2e           # needs wrk (apt-get install wrk)

One uvicorn process serves every variant (bare, a do-nothing middleware, the middleware idle,
the same with the hooks on, 1 % and 10 % sampled: see ``e2e_app``), switched between wrk runs,
so the variants share the process: measured each in its own process, as before 2026-11-30's fourth
session, the do-nothing middleware read anywhere from 0.75x to 1.23x of the bare app, the
process's own layout deciding more than the code. wrk drives each route (``--routes``, by
default ``/parallel``, which waits on fetches, and ``/cache``, which is all CPU) with 50
connections, for an untimed second after each switch and then a bounded time; the variants'
order rotates from round to round, and the ratios of requests per second to the bare app (taken
within each round) are medians, with their interquartile range. Two cores are shared by uvicorn
and wrk, so absolute numbers are low; the ratios are what to read. uvicorn and wrk are each kept
on one CPU, and the server's CPU time per request is given beside requests per second, with
and without the time its garbage collector ran (counted in the server through
``gc.callbacks``), with the collector's share and its full collections per request: a full
collection of the sample app's heap takes tens of milliseconds on a shared VM, so the table
says whether a variant made the collector run more, and what its ratio is without it.

Then latency as a client sees it (``--latency-rounds``): wrk over one connection, each request
sent when the last is answered, on the bare app, the middleware untraced, and requests that ask
for a trace (``X-Async-Trace: 1``) traced to the store only or with the trace in the response
header. wrk and uvicorn share one CPU for this: on two CPUs each side sleeps while the other
works, and on this VM waking a sleeping CPU took longer than the request (a bare ``/cache``
read 870 µs that way, 250 µs on one CPU, its rounds 0.6x to 1.25x of each other).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

VARIANTS = ("bare", "floor", "idle", "hooks", "sampled", "sampled10")
RATES = {"sampled": 0.01, "sampled10": 0.1}  # their sample_rate in e2e_app
# The latency table's columns: (variant, whether the request asks for a trace, label).
LATENCY = (("bare", False, "bare app"), ("hooks", False, "middleware, untraced (hooks on)"),
           ("stored", True, "traced, to the store"),
           ("hooks", True, "traced, trace in the response header"))  # fmt: skip
CONTROL = "/__bench/variant/"  # as in e2e_app, which this process does not import
GC_STATS = "/__bench/gc"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pinned(cpu: int, command: list[str]) -> list[str]:
    """``command`` kept on one CPU, so that uvicorn and wrk do not trade places (where there
    are two CPUs and ``taskset``)."""
    if (os.cpu_count() or 1) < 2 or shutil.which("taskset") is None:
        return command
    return ["taskset", "-c", str(cpu), *command]


def _serve(port: int, db: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SAMPLE_DB": db}
    command = _pinned(1, [sys.executable, "-m", "uvicorn", "benchmarks.e2e_app:app", "--port",
                          str(port), "--log-level", "warning", "--no-access-log"])  # fmt: skip
    proc = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/parallel", timeout=2)
            return proc
        except httpx.TransportError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("uvicorn did not start") from None
            time.sleep(0.1)


def _cpu_s(pid: int) -> float:
    """The process's user + system CPU time so far, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _collections(base: str) -> tuple[float, int]:
    """Seconds the server's garbage collector ran, and its full collections, since the last
    call."""
    got = httpx.get(f"{base}{GC_STATS}", timeout=10).json()
    return got["ns"] / 1e9, int(got["full"])


def _wrk(base: str, route: str, seconds: int, server: int) -> tuple[float, ...]:
    """Requests per second; per second of the server's CPU time (which leaves out the time
    wrk and the rest of the machine took from it); per second of that CPU time outside the
    garbage collector; the share of the server's CPU time the collector took; and its full
    collections per 10,000 requests."""
    _collections(base)
    cpu = _cpu_s(server)
    out = _run_wrk(0, ["-c50", f"-d{seconds}s"], base + route)
    cpu = _cpu_s(server) - cpu
    in_gc, full = _collections(base)
    count = re.search(r"(\d+) requests in", out)
    assert count, out
    n = int(count.group(1))
    return _rate(out), n / cpu, n / max(cpu - in_gc, 1e-9), in_gc / cpu, 1e4 * full / n


def _run_wrk(cpu: int, options: list[str], url: str) -> str:
    """wrk's report of one run, with one thread, kept on ``cpu``."""
    return subprocess.run(_pinned(cpu, ["wrk", "-t1", *options, url]),
                          capture_output=True, text=True, check=True).stdout  # fmt: skip


def _rate(report: str) -> float:
    """Requests per second, from wrk's report."""
    rate = re.search(r"Requests/sec:\s+([\d.]+)", report)
    assert rate, report
    return float(rate.group(1))


def _latency(base: str, route: str, seconds: int, traced: bool) -> float:
    """Microseconds per request as the client sees them: one connection, each request sent
    when the last is answered (wrk's requests per second over one connection, inverted)."""
    ask = ["-H", "X-Async-Trace: 1"] if traced else []
    return 1e6 / _rate(_run_wrk(1, ["-c1", f"-d{seconds}s", *ask], base + route))


def _check_traced(base: str, route: str, traced: bool) -> None:
    """The variant does what its column says: a trace id in the response when it asked for a
    trace (inline data unless to the store only), none when it did not."""
    got = httpx.get(base + route, headers={"X-Async-Trace": "1"} if traced else {}, timeout=10)
    got.raise_for_status()
    if traced != ("x-async-trace-id" in got.headers):
        raise RuntimeError(f"{route}: traced={traced} but headers {dict(got.headers)}")


def _latency_rounds(base: str, routes: list[str], rounds: int, seconds: int
                    ) -> dict[tuple[str, int], list[float]]:  # fmt: skip
    """Each route's latency in each column of ``LATENCY``, round by round, the columns'
    order rotated from round to round."""
    results: dict[tuple[str, int], list[float]] = {(r, i): [] for r in routes for i in
                                                   range(len(LATENCY))}  # fmt: skip
    for r in range(rounds):
        order = [(r + k) % len(LATENCY) for k in range(len(LATENCY))]
        for route in routes:
            for i in order:
                variant, traced, _ = LATENCY[i]
                httpx.post(f"{base}{CONTROL}{variant}", timeout=10).raise_for_status()
                _check_traced(base, route, traced)
                _latency(base, route, 1, traced)  # untimed: lookups re-learned, caches warm
                results[(route, i)].append(_latency(base, route, seconds, traced))
    return results


def _latency_table(results: dict[tuple[str, int], list[float]], routes: list[str]) -> str:
    """Per route: the bare app's latency, and each column's median ratio to it (taken within
    each round), with the middle half of the rounds' ratios."""
    lines = ["| route | " + " | ".join(label for _, _, label in LATENCY) + " | target |",
             "|---" * (len(LATENCY) + 2) + "|"]  # fmt: skip
    for route in routes:
        bare = results[(route, 0)]
        cells = [f"{statistics.median(bare):.0f} µs"]
        for i in range(1, len(LATENCY)):
            ratios = [x / b for x, b in zip(results[(route, i)], bare, strict=True)]
            q1, _, q3 = statistics.quantiles(ratios, n=4)
            cells.append(f"{statistics.median(ratios):.3f}x ({q1:.3f} to {q3:.3f})")
        lines.append(f"| {route} | " + " | ".join(cells) + " | traced <= 1.25x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=2)
    parser.add_argument("--latency-rounds", type=int, default=8,
                        help="rounds of the one-connection latency table (0: none)")  # fmt: skip
    parser.add_argument("--routes", default="/parallel,/cache",
                        help="comma-separated: a route that waits, one all CPU")  # fmt: skip
    args = parser.parse_args()
    if args.rounds < 2 or args.latency_rounds == 1:
        parser.error("--rounds (and --latency-rounds, unless 0) must be at least 2: the tables "
                     "give the rounds' spread")  # fmt: skip
    routes = args.routes.split(",")
    db = os.path.join(tempfile.mkdtemp(), "e2e.db")
    port = _port()
    proc = _serve(port, db)
    base = f"http://127.0.0.1:{port}"
    try:
        results: dict[tuple[str, str], list[tuple[float, ...]]] = {
            (route, v): [] for route in routes for v in VARIANTS
        }
        for r in range(args.rounds):
            order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
            for route in routes:
                for v in order:  # rotated, so no variant always runs first or last
                    httpx.post(f"{base}{CONTROL}{v}", timeout=10).raise_for_status()
                    _wrk(base, route, 1, proc.pid)  # untimed: lookups re-learned
                    results[(route, v)].append(_wrk(base, route, args.seconds, proc.pid))
        latency = _latency_rounds(base, routes, args.latency_rounds, args.seconds)
    finally:
        proc.terminate()
        proc.wait(10)
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs: one uvicorn process on "
          f"loopback (CPU 1) serving every variant, wrk -t1 -c50 (CPU 0) for {args.seconds} s "
          f"after 1 s untimed, {args.rounds} rounds; medians of the rounds' ratios to the bare "
          "app, and in brackets their middle half (how much they moved)\n")  # fmt: skip
    print("| route | variant | requests/s | vs bare | per CPU second, vs bare "
          "| per CPU second outside the collector, vs bare | the collector's share of the "
          "server's CPU | full collections per 10,000 requests | target |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    rows = (("bare", "bare app", "-"), ("floor", "a do-nothing middleware (the floor)", "-"),
            ("idle", "middleware, untraced", ">= 0.99x"),
            ("hooks", "the same, hooks on (as after the first traced request)", ">= 0.99x"),
            ("sampled", "1 % sampled", ">= 0.98x"), ("sampled10", "10 % sampled", "-"))  # fmt: skip
    for route in routes:
        bare = results[(route, "bare")]
        for v, label, target in rows:
            got = results[(route, v)]
            cells = []
            for i in (0, 1, 2):  # wall clock, the server's CPU time, that outside the GC
                ratios = [x[i] / b[i] for x, b in zip(got, bare, strict=True)]
                q1, _, q3 = statistics.quantiles(ratios, n=4)
                spread = f" ({q1:.3f} to {q3:.3f})" if v != "bare" else ""
                cells.append(f"{statistics.median(ratios):.3f}x{spread}")
            share = statistics.median(x[3] for x in got)
            full = statistics.median(x[4] for x in got)
            print(f"| {route} | {label} | {statistics.median(x[0] for x in got):.0f} "
                  f"| {cells[0]} | {cells[1]} | {cells[2]} | {100 * share:.1f} % "
                  f"| {full:.1f} | {target} |")  # fmt: skip
    print()
    print(_traced_cost_table(results, routes))
    if args.latency_rounds:
        print(f"\nLatency as the client sees it: wrk -t1 -c1 (one connection, each request sent "
              f"when the last is answered) for {args.seconds} s after 1 s untimed, "
              f"{args.latency_rounds} rounds, every request of a traced column asking with "
              "`X-Async-Trace: 1`; medians of the rounds' ratios to the bare app, in brackets "
              "their middle half\n")  # fmt: skip
        print(_latency_table(latency, routes))


def _traced_cost(sampled: tuple[float, ...], hooks: tuple[float, ...], rate: float) -> float:
    """What one traced request costs, in untraced requests, from one round's requests per CPU
    second with a share ``rate`` traced, against the same round's with none traced (the hooks
    on in both): ``(1 - rate) + rate * cost`` untraced requests' time per request."""
    return 1 + (hooks[1] / sampled[1] - 1) / rate


def _traced_cost_table(results: dict[tuple[str, str], list[tuple[float, ...]]],
                       routes: list[str]) -> str:  # fmt: skip
    """Per route: a traced request's cost in untraced ones, from the 10 % and the 1 % runs (in
    the server's CPU time, against the hooks-on runs of the same rounds); and what the 10 %
    figure predicts for 1 %, beside what the 1 % runs measured. At 10 % the traced requests'
    share of the time is ten times what it is at 1 %, and so ten times as far above the
    rounds' noise."""
    lines = ["| route | a traced request costs, from the 10 % runs | from the 1 % runs | "
             "1 % sampled vs hooks on, predicted from the 10 % runs | measured |",
             "|---|---|---|---|---|"]  # fmt: skip
    for route in routes:
        hooks = results[(route, "hooks")]
        cost = {v: statistics.median(_traced_cost(x, h, rate) for x, h in
                                     zip(results[(route, v)], hooks, strict=True))
                for v, rate in RATES.items()}  # fmt: skip
        measured = statistics.median(
            x[1] / h[1] for x, h in zip(results[(route, "sampled")], hooks, strict=True)
        )
        predicted = 1 / (1 + RATES["sampled"] * (cost["sampled10"] - 1))
        lines.append(f"| {route} | {cost['sampled10']:.1f} untraced | {cost['sampled']:.1f} "
                     f"untraced | {predicted:.3f}x | {measured:.3f}x |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
