"""Smoke test of bench/eval.py: the micro preset runs end to end on CPU and its report is well
formed (rates positive and finite, the docs block replaced, not appended). Timings not checked."""

from __future__ import annotations

import math
from pathlib import Path

from bench_support import load_bench


def test_eval_bench_micro(tmp_path: Path) -> None:
    bench = load_bench("eval")
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nhand-written notes stay\n")
    report = bench.main(["--preset", "micro", "--out", str(docs)])
    assert [r.case for r in report.rows] == ["tiny-base@32px"]
    for value in report.rows[0].rates().values():
        assert math.isfinite(value) and value > 0
    assert report.fid is not None and report.fid.wall > 0
    # Writing again replaces the marked block.
    bench.write_section(docs, report.section_key, "again", report.to_markdown())
    text = docs.read_text()
    assert "hand-written notes stay" in text and text.count("<!-- eval:micro start -->") == 1
    assert "| tiny-base@32px |" in text and "PLMS 2 steps" in text
