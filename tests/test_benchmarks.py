"""`python -m benchmarks --readme` can write every table: the markers exist, one block moves."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.__main__ import BENCHMARKS, ROOT, replace_block


def test_the_readme_has_a_block_for_every_benchmark() -> None:
    text = (ROOT / "README.md").read_text()
    for _, marker, _, _ in BENCHMARKS.values():
        assert replace_block(text, marker, "new table") != text


def test_replace_block_swaps_only_its_own_block() -> None:
    text = "a\n<!-- x:start -->\nold\n<!-- x:end -->\nb\n<!-- y:start -->\nkeep\n<!-- y:end -->\n"
    out = replace_block(text, "x", "| new |\n")
    assert out == text.replace("old", "| new |")
    with pytest.raises(SystemExit, match="no <!-- z:start -->"):
        replace_block(text, "z", "t")


def _run(per_cpu_s: float) -> tuple[float, ...]:
    """One wrk run as bench_e2e keeps it: requests/s, per CPU second, and the rest unused."""
    return (per_cpu_s, per_cpu_s, per_cpu_s, 0.2, 4.0)


def test_the_e2e_table_recovers_what_a_traced_request_costs() -> None:
    from benchmarks.bench_e2e import _traced_cost_table

    # A traced request costing 3 untraced ones: (1 - p) + 3p untraced requests' time each.
    def at(rate: float, untraced: float) -> tuple[float, ...]:
        return _run(untraced / (1 - rate + 3 * rate))

    hooks = [_run(1000.0), _run(1100.0), _run(900.0)]  # rounds differ; each is its own base
    results = {
        ("/r", "hooks"): hooks,
        ("/r", "sampled10"): [at(0.1, h[1]) for h in hooks],
        ("/r", "sampled"): [at(0.01, h[1]) for h in hooks],
    }
    table = _traced_cost_table(results, ["/r"])
    assert table.splitlines()[-1] == "| /r | 3.0 untraced | 3.0 untraced | 0.980x | 0.980x |"
    # A 1 % run 2 % slower than its cost says reads as 2 more untraced requests a traced one.
    results[("/r", "sampled")] = [_run(x[1] * 0.98) for x in results[("/r", "sampled")]]
    assert "| 3.0 untraced | 5.1 untraced | 0.980x | 0.961x |" in _traced_cost_table(
        results, ["/r"]
    )


def test_the_e2e_latency_table_gives_each_column_against_the_bare_app() -> None:
    from benchmarks.bench_e2e import LATENCY, _latency_table

    # Two rounds on different days: the bare app 200 then 300 µs, each column a fixed ratio.
    ratios = (1.0, 1.02, 1.3, 2.0)
    assert len(ratios) == len(LATENCY)
    results = {("/r", i): [200 * x, 300 * x] for i, x in enumerate(ratios)}
    row = _latency_table(results, ["/r"]).splitlines()[-1]
    assert row == ("| /r | 250 µs | 1.020x (1.020 to 1.020) | 1.300x (1.300 to 1.300) "
                   "| 2.000x (2.000 to 2.000) | traced <= 1.25x |")  # fmt: skip


def _cache_dir(tmp: Path, level: str, size: str, ways: str) -> Path:
    for name, text in (("level", level), ("size", size), ("ways_of_associativity", ways)):
        (tmp / name).write_text(text + "\n")
    return tmp


def test_bench_misses_models_this_machines_second_level(tmp_path: Path) -> None:
    from benchmarks.bench_misses import second_level

    assert second_level(_cache_dir(tmp_path, "2", "2048K", "16")) == (2 * 1024 * 1024, 16)
    assert second_level(_cache_dir(tmp_path, "2", "1024K", "8")) == (1024 * 1024, 8)
    # not a second level, sets not a power of two (callgrind cannot model them), nothing there
    assert second_level(_cache_dir(tmp_path, "3", "32768K", "16")) == (512 * 1024, 8)
    assert second_level(_cache_dir(tmp_path, "2", "1280K", "20")) == (1280 * 1024, 20)
    assert second_level(_cache_dir(tmp_path, "2", "1536K", "8")) == (512 * 1024, 8)
    assert second_level(tmp_path / "absent") == (512 * 1024, 8)
