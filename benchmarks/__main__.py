"""Every benchmark in one command, each in its own process, in the order the README shows them.

    python -m benchmarks                # print each table
    python -m benchmarks --readme       # ... and write each into README.md between its markers
    python -m benchmarks --quick        # fewer rounds where a benchmark has them (a smoke check)
    python -m benchmarks hooks routes   # only these

The end-to-end benchmark needs ``wrk``, the viewer's ``/usr/bin/chromium``, the instruction
counts, their breakdown and their cache misses ``valgrind``; when one is missing, that
benchmark is reported as skipped, with the reason, and the others still run.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# name: (module, README marker, what it needs, takes --quick)
BENCHMARKS: dict[str, tuple[str, str, str | None, bool]] = {
    "hooks": ("benchmarks.bench_hooks", "bench", None, True),
    "instructions": ("benchmarks.bench_instructions", "instructions", "valgrind", True),
    "costs": ("benchmarks.bench_costs", "costs", "valgrind", True),
    "misses": ("benchmarks.bench_misses", "misses", "valgrind", True),
    "routes": ("benchmarks.bench_routes", "routes", None, True),
    "parts": ("benchmarks.bench_parts", "parts", None, True),
    "viewer": ("benchmarks.bench_viewer", "viewer", "/usr/bin/chromium", False),
    "e2e": ("benchmarks.bench_e2e", "e2e", "wrk", False),
}


def _missing(need: str | None) -> str | None:
    if need is None:
        return None
    found = os.path.exists(need) if need.startswith("/") else shutil.which(need) is not None
    return None if found else f"needs {need}"


def replace_block(text: str, marker: str, body: str) -> str:
    """``text`` with what lies between ``<!-- marker:start -->`` and its end replaced."""
    pattern = re.compile(rf"(<!-- {marker}:start -->\n).*?(<!-- {marker}:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no <!-- {marker}:start --> ... <!-- {marker}:end -->")
    return pattern.sub(lambda m: m.group(1) + body.strip("\n") + "\n" + m.group(2), text, count=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("only", nargs="*", metavar="NAME",
                        help=f"run only these ({', '.join(BENCHMARKS)})")  # fmt: skip
    parser.add_argument("--readme", action="store_true", help="write the tables into README.md")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke check)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.only if n not in BENCHMARKS]
    if unknown:
        parser.error(f"no benchmark named {', '.join(unknown)}; there are {', '.join(BENCHMARKS)}")
    failed = 0
    readme = ROOT / "README.md"
    for name in args.only or list(BENCHMARKS):
        module, marker, need, quick = BENCHMARKS[name]
        print(f"== {name}: python -m {module}", flush=True)
        why = _missing(need)
        if why is not None:
            print(f"skipped: {why}\n", flush=True)
            continue
        cmd = [sys.executable, "-m", module, *(["--quick"] if args.quick and quick else [])]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        print(done.stdout, flush=True)
        if done.returncode != 0:
            failed += 1
            print(f"{name} failed (exit {done.returncode}):\n{done.stderr}", file=sys.stderr)
            continue
        if args.readme:
            readme.write_text(replace_block(readme.read_text(), marker, done.stdout))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
