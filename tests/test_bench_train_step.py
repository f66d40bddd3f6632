"""Smoke test of bench/train_step.py: the tiny-cpu preset at micro size runs both steps (full
and UNet-only) of both tiny models end to end, and the report is well formed; the depth
comparison (``--depth``: midas vs shard) runs the estimator in the midas step only and adds
exactly its FLOPs. No timing checks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from bench_support import load_bench

from sdtrain.errors import ConfigError


def test_train_step_tiny_cpu_micro(tmp_path: Path) -> None:
    bench = load_bench("train_step")
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nhand-written notes stay\n")
    argv = ["--preset", "tiny-cpu", "--pixels", "32", "--batch-size", "1", "--iters", "2",
            "--warmup", "1", "--matmul-size", "128", "--threads", "1"]  # fmt: skip
    report = bench.main([*argv, "--out", str(docs)])

    assert not report.skipped
    assert report.matmul_flops_per_s > 0
    cases = ["tiny-base@32px", "tiny-inpainting@32px"]
    assert [(r.case, r.step) for r in report.rows] == [(c, s) for c in cases for s in bench.STEPS]
    for row in report.rows:
        assert math.isfinite(row.images_per_s) and row.images_per_s > 0
        assert row.median_ms > 0 and row.flops > 0
        assert 0 < row.utilisation < 1.5
        assert row.peak_mib is None  # CPU: no device memory statistics
    # The full step also encodes images and text: more FLOPs than the UNet alone.
    by_key = {(r.case, r.step): r for r in report.rows}
    for case in cases:
        assert by_key[case, "full"].flops > by_key[case, "unet"].flops

    # Writing twice replaces the marked block instead of appending a second one.
    bench.write_section(docs, report.section_key, "again", report.to_markdown())
    text = docs.read_text()
    assert "hand-written notes stay" in text
    assert text.count("<!-- train_step:tiny-cpu start -->") == 1
    assert "| tiny-inpainting@32px | unet |" in text


def test_gpu_preset_skips_without_cuda(monkeypatch) -> None:
    bench = load_bench("train_step")
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    report = bench.main(["--preset", "gpu"])
    assert report.skipped and not report.rows
    assert "Skipped" in report.to_markdown()


def test_train_step_lora_rows(tmp_path: Path) -> None:
    bench = load_bench("train_step")
    argv = ["--preset", "tiny-cpu", "--models", "tiny-base", "--pixels", "32", "--batch-size", "1",
            "--iters", "2", "--warmup", "1", "--matmul-size", "128", "--threads", "1",
            "--lora"]  # fmt: skip
    report = bench.main([*argv, "--out", str(tmp_path / "b.md")])
    cases = ["tiny-base@32px", "tiny-base+lora@32px"]
    assert [(r.case, r.step) for r in report.rows] == [(c, s) for c in cases for s in bench.STEPS]
    by_key = {(r.case, r.step): r for r in report.rows}
    # The LoRA step computes the frozen UNet's forward and backward too, plus the adapter.
    assert by_key["tiny-base+lora@32px", "unet"].flops > 0
    assert report.section_key == "train_step:tiny-cpu+lora"
    assert "LoRA rank 4" in (tmp_path / "b.md").read_text()


def test_train_step_depth_midas_vs_shard(tmp_path: Path) -> None:
    bench = load_bench("train_step")
    docs = tmp_path / "b.md"
    argv = ["--preset", "tiny-cpu", "--depth", "--pixels", "32", "--batch-size", "1",
            "--iters", "2", "--warmup", "1", "--threads", "1", "--clock", "cpu"]  # fmt: skip
    report = bench.main([*argv, "--out", str(docs)])
    assert not report.skipped and not report.rows
    assert [(r.case, r.step) for r in report.depth_rows] == [
        ("tiny-depth@32px", s) for s in ("shard", "midas", "estimator")
    ]
    by_step = {r.step: r for r in report.depth_rows}
    for row in report.depth_rows:
        assert math.isfinite(row.median_ms) and row.median_ms > 0
    # The midas step ran the estimator once per round (1 warm-up + 2 timed), the shard step never.
    assert by_step["shard"].estimator_calls == 0
    assert by_step["midas"].estimator_calls == 3
    assert by_step["estimator"].estimator_calls == 3
    # On-line depth adds exactly the estimator's FLOPs to the otherwise identical step.
    shard, midas, alone = (by_step[s].flops for s in ("shard", "midas", "estimator"))
    assert alone > 0 and midas == shard + alone
    assert by_step["shard"].ratio == 1.0
    assert report.section_key == "train_step:tiny-cpu+depth"
    text = docs.read_text()
    assert "`model.depth.estimator=tiny`" in text and "| tiny-depth@32px | midas |" in text
    assert "clock: cpu" in text


def test_train_step_depth_rejects_a_model_without_depth() -> None:
    bench = load_bench("train_step")
    argv = ["--preset", "tiny-cpu", "--depth", "--models", "tiny-base", "--pixels", "32",
            "--batch-size", "1", "--iters", "1", "--warmup", "0"]  # fmt: skip
    # The config loader's own check, naming the key (a depth source on a model without depth).
    with pytest.raises(ConfigError, match=r"'model\.depth\.source'.*has no depth channel"):
        bench.main(argv)
