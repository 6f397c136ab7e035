"""`python -m benchmarks --readme` can write every table: the markers exist, one block moves."""

from __future__ import annotations

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
