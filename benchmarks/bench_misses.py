"""Why a traced request's extra instructions take longer than their count says: the cache
misses and mispredicted branches of one request, traced and untraced, as callgrind models them.

    python -m benchmarks.bench_misses            # a Markdown table (needs valgrind)
    python -m benchmarks.bench_misses --quick    # fewer requests, for a smoke check

The same one-request-at-a-time count as bench_instructions' latency table (from a request's
start to the moment the app hands the server its response's last chunk, the hooks on, the
store full), run with ``--cache-sim=yes --branch-sim=yes``: callgrind then also counts misses
in a first-level instruction and data cache and in a second cache the size of this machine's
second level (see models()), and the branches a simple predictor would get wrong. A model, not
the processor: its figures say where the time goes, not how much of it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from .bench_instructions import ROUTES, _answers, _callgrind, _events

# Callgrind models a first-level cache and a last one; the last is given the size and ways of
# this machine's second-level cache (read from sysfs; 512 KiB, 8-way where it cannot be read),
# so that what it misses is what a request fetches from the shared third level or from memory:
# where a cold processor pays. (Until 2026-12-01's fourteenth session it was always 512 KiB;
# that session's machine has 2 MiB, where neither variant misses it: see HISTORY.md.)
_L2 = Path("/sys/devices/system/cpu/cpu0/cache/index2")


def second_level(where: Path = _L2) -> tuple[int, int]:
    """This machine's second-level cache: (bytes, ways); (512 KiB, 8) where unknown."""
    try:
        if (where / "level").read_text().strip() != "2":
            raise ValueError("index2 is not the second level")
        size = (where / "size").read_text().strip().upper()
        ways = int((where / "ways_of_associativity").read_text())
        factor = {"K": 1024, "M": 1024 * 1024}.get(size[-1:], 1)
        found = int(size.rstrip("KM")) * factor
        # callgrind wants a power-of-two number of sets
        if found <= 0 or ways <= 0 or (found // (64 * ways)) & (found // (64 * ways) - 1):
            raise ValueError(f"{found} bytes, {ways} ways")
        return found, ways
    except (OSError, ValueError):
        return 512 * 1024, 8


def models() -> tuple[str, ...]:
    size, ways = second_level()
    return ("--cache-sim=yes", "--branch-sim=yes", f"--LL={size},{ways},64")


VARIANTS = {
    "untraced": "untraced, hooks on",
    "stored": "traced, to the store only",
    "rare": "traced to the store, each after 49 untraced",
}
# (column, the events that make it up)
COLUMNS = [
    ("instructions", ("Ir",)),
    ("instruction-cache misses", ("I1mr",)),
    ("data-cache misses", ("D1mr", "D1mw")),
    ("second-level misses", ("ILmr", "DLmr", "DLmw")),
    ("mispredicted branches", ("Bcm", "Bim")),
]


def _per_request(variant: str, warmup: int, n: int, scratch: str) -> list[dict[str, float]]:
    """Per route, each column's median over the counted requests of one variant."""
    out = _callgrind("latency-worker", variant, warmup, n, scratch, models())
    found = []
    for dumps in _answers(out, n):
        parts = [_events(dump) for dump in dumps]
        found.append({
            column: statistics.median(sum(p.get(e, 0) for e in events) for p in parts)
            for column, events in COLUMNS
        })  # fmt: skip
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke check)")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("needs valgrind (Debian's package valgrind)")
    n = 11 if args.quick else 41
    with tempfile.TemporaryDirectory() as scratch, concurrent.futures.ThreadPoolExecutor(2) as pool:
        jobs = {v: pool.submit(_per_request, v, 200, n, scratch) for v in VARIANTS}
        got = {v: job.result() for v, job in jobs.items()}
    size, ways = second_level()
    print(f"Python {sys.version.split()[0]}, valgrind callgrind with its cache (a {size // 1024} "
          f"KiB, {ways}-way second level, this machine's) and branch models; one request at a "
          f"time, up to its answer, the median of {n} after 200 uncounted\n")  # fmt: skip
    print("| route | variant | " + " | ".join(c for c, _ in COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for i, (label, _, _) in enumerate(ROUTES):
        base = got["untraced"][i]
        for variant, name in VARIANTS.items():
            row = got[variant][i]
            cells = []
            for column, _ in COLUMNS:
                cell = f"{row[column]:,.0f}"
                if variant != "untraced" and base[column]:
                    cell += f" ({row[column] / base[column]:.2f}x)"
                cells.append(cell)
            print(f"| {label} | {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
