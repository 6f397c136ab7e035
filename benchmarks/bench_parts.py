"""A traced `/cache` request's latency in time, with each part of the recording turned off.

    python -m benchmarks.bench_parts            # the table
    python -m benchmarks.bench_parts --quick    # fewer rounds (a smoke check)

bench_costs takes a traced request's *instructions* apart; this takes its *time* apart, on
the route where the tracer's cost shows most (`/cache`: 19 resources in 0.1 ms of CPU work,
nothing to wait on). Each variant is the middleware with one setting changed, every request
traced to the store (no header); each is timed, like bench_routes' latency table, on the
last of four requests in a row, the variants in a new random order each round, and compared
with the bare app and with an untraced request through the same middleware (the hooks on, as
after a first traced request: what #8's "traced vs untraced" compares) timed in the same
rotation. What a row saves is what that part costs in time: it says which setting buys how
much on a CPU-bound route, and how far the defaults are from the 1.25x target.

The order is shuffled because where a variant stands in it counts: in a fixed rotation (each
leading in turn, until 2026-12-01's eighteenth session) the variant right after the untraced
ones ran about 0.015x slower than the same middleware three places later, and the defaults
always stood first, so each other row's saving read up to that much too high (the watchdog's
0.018x was all of it: with its calls made no-ops the two rows were as far apart).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import statistics
import sys
import tempfile
from typing import Any

from benchmarks.harness import answered, bare_app

_IN_A_ROW = 4
PATH = "/cache"


def _variants(bare: Any) -> dict[str, Any]:
    from asgi_asynctrace import AsyncTraceMiddleware, TraceLimits

    def traced(**settings: Any) -> Any:
        return AsyncTraceMiddleware(
            bare, log_traces=False, store_size=100, sample_rate=1.0, **settings
        )

    lean = {"limits": TraceLimits(max_stack_depth=0), "record_futures": False}
    return {
        "the defaults (everything recorded)": traced(),
        "no creation stacks (`TraceLimits(max_stack_depth=0)`)": traced(
            limits=TraceLimits(max_stack_depth=0)
        ),
        "no futures (`record_futures=False`)": traced(record_futures=False),
        "no blocked-loop watchdog (`blocked_sample_ms=None`)": traced(blocked_sample_ms=None),
        "none of the three": traced(blocked_sample_ms=None, **lean),
    }


async def parts_table(rounds: int) -> list[str]:
    from asgi_asynctrace import AsyncTraceMiddleware
    from asgi_asynctrace._hooks import uninstall_hooks
    from sample_app.app import app as sample

    bare = bare_app(sample)
    untraced = AsyncTraceMiddleware(bare, log_traces=False, store_size=100)
    apps = {"bare": bare, "untraced": untraced, **_variants(bare)}
    names = list(apps)
    order, rng = names[:], random.Random(8)
    got: dict[str, list[float]] = {name: [] for name in names}
    against: dict[str, list[float]] = {name: [] for name in names}  # vs the untraced request
    for _ in range(rounds):
        took: dict[str, int] = {}
        rng.shuffle(order)  # a new order each round: see the docstring
        for name in order:
            for _ in range(_IN_A_ROW - 1):
                await answered(apps[name], PATH, False)
            took[name] = await answered(apps[name], PATH, False)
        got["bare"].append(took["bare"])
        for name in names[1:]:
            got[name].append(took[name] / took["bare"])
            against[name].append(took[name] / took["untraced"])
    uninstall_hooks()
    median = {name: statistics.median(v) for name, v in got.items()}
    versus = {name: statistics.median(v) for name, v in against.items() if v}
    traced = names[2:]
    defaults = median[traced[0]]
    rows = [
        f"| `{PATH}`, traced to the store | latency vs an untraced request | vs the bare app "
        "| saves, vs the defaults |",
        "|---|---|---|---|",
    ]
    for name in traced:
        saved = "-" if name == traced[0] else f"{defaults - median[name]:.3f}x"
        rows.append(f"| {name} | {versus[name]:.3f}x | {median[name]:.3f}x | {saved} |")
    rows.append(f"| (an untraced request, the hooks on) | 1.000x | {median['untraced']:.3f}x | - |")
    rows.append(f"| (the bare app) | - | {median['bare'] / 1e3:.0f} µs | - |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke check)")
    args = parser.parse_args()
    rounds = 30 if args.quick else 3000
    os.environ.setdefault("SAMPLE_DB", os.path.join(tempfile.mkdtemp(), "bench.db"))
    logging.getLogger("asgi_asynctrace.trace").setLevel(logging.WARNING)
    rows = asyncio.run(parts_table(rounds))
    print(f"Python {sys.version.split()[0]}; one request at a time, each variant timed on the "
          f"last of {_IN_A_ROW} in a row, {rounds} rounds; medians of the ratios\n")  # fmt: skip
    print("\n".join(rows))


if __name__ == "__main__":
    main()
