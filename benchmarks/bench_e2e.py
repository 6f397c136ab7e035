"""End to end: uvicorn on loopback under wrk, the sample app bare vs with the middleware.

    python -m benchmarks.bench_e2e           # needs wrk (apt-get install wrk)

Each variant (bare, a do-nothing middleware, middleware idle, 1 % sampled) runs in its own
uvicorn process; wrk drives each route (``--routes``, by default ``/parallel``, which waits on
fetches, and ``/cache``, which is all CPU) for a bounded time with 50 connections; the variants'
order rotates from round to round and the ratios of requests per second to the bare app (taken
within each round) are medians, with their interquartile range. Two cores are shared by uvicorn
and wrk, so absolute numbers are low; the ratios are what to read.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

VARIANTS = ("bare", "floor", "idle", "sampled")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(variant: str, port: int, db: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "ASYNCTRACE_BENCH_VARIANT": variant, "SAMPLE_DB": db}
    command = [sys.executable, "-m", "uvicorn", "benchmarks.e2e_app:app", "--port", str(port),
               "--log-level", "warning", "--no-access-log"]  # fmt: skip
    proc = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/parallel", timeout=2)
            return proc
        except httpx.TransportError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"uvicorn ({variant}) did not start") from None
            time.sleep(0.1)


def _wrk(url: str, seconds: int) -> float:
    out = subprocess.run(["wrk", "-t1", "-c50", f"-d{seconds}s", url], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert match, out
    return float(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--routes", default="/parallel,/cache",
                        help="comma-separated: a route that waits, one all CPU")  # fmt: skip
    args = parser.parse_args()
    routes = args.routes.split(",")
    db = os.path.join(tempfile.mkdtemp(), "e2e.db")
    ports = {v: _port() for v in VARIANTS}
    procs = {v: _serve(v, ports[v], db) for v in VARIANTS}
    try:
        results: dict[tuple[str, str], list[float]] = {
            (route, v): [] for route in routes for v in VARIANTS
        }
        for r in range(args.rounds):
            order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
            for route in routes:
                for v in order:  # rotated, so no variant always runs first or last
                    url = f"http://127.0.0.1:{ports[v]}{route}"
                    results[(route, v)].append(_wrk(url, args.seconds))
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(10)
    print(f"Python {sys.version.split()[0]}, uvicorn on loopback, wrk -t1 -c50 -d{args.seconds}s, "
          f"{args.rounds} rounds; medians, and in brackets the middle half of the rounds' "
          "ratios (how much they moved)\n")  # fmt: skip
    print("| route | variant | requests/s | vs bare | target |")
    print("|---|---|---|---|---|")
    rows = (("bare", "bare app", "-"), ("floor", "a do-nothing middleware (the floor)", "-"),
            ("idle", "middleware, untraced", ">= 0.99x"),
            ("sampled", "1 % sampled", ">= 0.98x"))  # fmt: skip
    for route in routes:
        bare = results[(route, "bare")]
        for v, label, target in rows:
            ratios = [r / b for r, b in zip(results[(route, v)], bare, strict=True)]
            q1, _, q3 = statistics.quantiles(ratios, n=4)
            spread = f" ({q1:.2f} to {q3:.2f})" if v != "bare" else ""
            print(f"| {route} | {label} | {statistics.median(results[(route, v)]):.0f} "
                  f"| {statistics.median(ratios):.3f}x{spread} | {target} |")  # fmt: skip


if __name__ == "__main__":
    main()
