"""Smoke test of bench/unet_step.py: the micro preset runs end to end on CPU, the diffusers twin
holds the same weights (outputs agree) and the report is well formed. Timings are not checked."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from bench_support import load_bench


def test_unet_step_micro(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    bench = load_bench("unet_step")
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nhand-written notes stay\n")

    argv = ["--preset", "micro", "--warmup", "1", "--iters", "2", "--threads", "1"]
    report = bench.main([*argv, "--out", str(docs)])

    assert report.ok and not report.skipped
    assert [r.case for r in report.rows] == ["micro-sd1", "micro-sd2"]
    for row in report.rows:
        assert row.note == ""
        assert row.max_abs_diff is not None and row.max_abs_diff < 1e-4 * max(1, row.output_scale)
        assert row.output_scale > 0.1  # random weights: a zero output would prove nothing
        assert math.isfinite(row.ratio) and row.ratio > 0
        assert row.ours_ms > 0 and row.theirs_ms > 0

    # Writing twice replaces the marked section instead of appending a second one.
    bench.write_section(docs, report.section_key, "again", report.to_markdown())
    text = docs.read_text()
    assert "hand-written notes stay" in text
    assert text.count("<!-- unet_step:micro start -->") == 1
    assert "| micro | micro-sd2 |" in text
