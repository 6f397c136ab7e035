"""bench_costs' table: its parts add up to what a traced request costs in all."""

from __future__ import annotations

import collections

from benchmarks.bench_costs import PATHS, VARIANTS, parts


def test_the_parts_add_up_to_the_whole_extra() -> None:
    # made-up counts, all different, so that a part taken from the wrong variant shows
    counts = {v: {p: 100_000 * (i + 1) + 1_000 * j + 7 * i * j for j, p in enumerate(PATHS)}
              for i, v in enumerate(VARIANTS)}  # fmt: skip
    kinds = collections.Counter({"task": 4, "future": 4, "timer": 5, "cache-get": 2,
                                 "cache-put": 1, "cache-delete": 1, "root": 1})  # fmt: skip
    rows, untraced, extra = parts(counts, kinds)
    assert untraced == counts["untraced"]["/cache"]
    assert extra == counts["full"]["/cache"] - untraced
    assert sum(count for _, count, _ in rows) == extra
    # each part says how many resources it is for, where it is for one kind
    per = {label.split(" (")[0]: items for label, _, items in rows if items is not None}
    assert per == {"tasks": 4, "futures": 4, "timers": 5, "aiocache calls": 4}
