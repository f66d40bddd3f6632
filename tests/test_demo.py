"""``sdtrain demo --quick`` end to end: the run folder it leaves, the filters at work, the
interrupted-and-resumed stage, and whether the tiny models learned what the prompts say.

The quick demo runs once per module (about 4.3 minutes on 2 idle CPU cores); every check after it
reads its files or samples from its exported checkpoints with fixed seeds.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtrain.data.synthetic import REJECT_REASONS, SCENE_COLOURS, SCENE_SHAPES, Scene, SceneShape
from sdtrain.data.synthetic import draw_scene as draw
from sdtrain.launch.demo import STAGES, open_exported, run_demo, stage_config
from sdtrain.launch.demo_report import (
    INPAINT_CASES,
    DemoResult,
    case_inputs,
    dominant_colour,
    masked_colour,
    region_differences,
)
from sdtrain.launch.sample import sample_images
from sdtrain.models.adapters.original import UNET_INPUT_CONV, read_checkpoint
from sdtrain.utils.images import to_uint8

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoResult]:
    saved = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_SILENT")}
    os.environ["WANDB_MODE"] = "offline"
    try:
        yield run_demo(tmp_path_factory.mktemp("demo") / "run", quick=True, seed=0)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def model_of(demo: DemoResult, stage: str):
    overrides = [f"model.autoencoder.scale_factor={demo.scale_factor}"]
    return open_exported(demo.exports[stage], stage_config(stage, overrides))


def steps_logged(run: Path, version: int) -> list[int]:
    with (run / "logs" / f"version_{version}" / "metrics.csv").open() as handle:
        return [int(row["step"]) for row in csv.DictReader(handle) if row.get("train/loss")]


# ---------------------------------------------------------------------------------------------
# What the run folder holds
# ---------------------------------------------------------------------------------------------


def test_report_grids_and_loss_plot_are_written(demo: DemoResult) -> None:
    report = demo.report.read_text()
    for name in ("base", "v", "inpainting"):
        grid = demo.grids[name]
        assert f"]({grid.relative_to(demo.out).as_posix()})" in report
        with Image.open(grid) as image:
            assert image.size[0] >= 96 and image.size[1] >= 96
    with Image.open(demo.loss_plot) as image:
        assert image.width == 300 * len(STAGES)
    assert "![loss curves](loss-curves.png)" in report
    assert (demo.out / "demo.json").is_file()


def test_exported_checkpoints_load_in_the_original_layout(demo: DemoResult) -> None:
    first = read_checkpoint(demo.exports["first-stage"])
    assert first.vae and first.text and not first.unet
    for stage, channels in (("base", 4), ("inpainting", 9), ("v", 4)):
        ckpt = read_checkpoint(demo.exports[stage])
        assert ckpt.unet and ckpt.vae and ckpt.text and ckpt.schedule
        assert ckpt.unet[UNET_INPUT_CONV].shape[1] == channels
        # every stage shares the first stage's autoencoder and text encoder
        for key, value in first.vae.items():
            assert torch.equal(ckpt.vae[key], value), (stage, key)
        for key, value in first.text.items():
            assert torch.equal(ckpt.text[key], value), (stage, key)


def test_filter_stats_show_every_rejection_reason_and_the_broken_images(demo: DemoResult) -> None:
    stats = demo.filter_stats
    assert stats["seen"] == demo.samples
    for reason in REJECT_REASONS:
        assert stats["rejected"].get(reason, 0) > 0, reason
    assert stats["errors"].get("bad_image", 0) > 0
    dropped = sum(stats["rejected"].values()) + sum(stats["errors"].values())
    assert stats["kept"] + dropped == stats["seen"]
    report = demo.report.read_text()
    assert "| rejected: watermark |" in report and "| error: bad_image |" in report


def test_the_interrupted_base_run_resumed_from_its_checkpoint(demo: DemoResult) -> None:
    run = demo.out / "base"
    resume = demo.resume
    stopped = resume["stopped_at"]
    assert resume["signal_step"] <= stopped < resume["final_step"]
    before, after = steps_logged(run, 0), steps_logged(run, 1)
    assert max(before) < stopped <= min(after)  # the second run starts where the first stopped
    assert max(after) == resume["final_step"] - 1
    assert resume["checkpoint"] == f"base/checkpoints/step={stopped:08d}.ckpt"
    assert (run / "checkpoints" / f"step={resume['final_step']:08d}.ckpt").is_file()
    assert "resume: auto" in (run / "config.yaml").read_text()
    assert len(list((run / "wandb").glob("offline-run-*"))) == 2


def test_base_and_inpainting_train_from_the_latent_shards_the_demo_encoded(
    demo: DemoResult,
) -> None:
    latents = demo.out / "latents"
    assert sorted(p.name for p in latents.glob("*.tar")) == [p.name for p in demo.shards]
    assert demo.latents["samples"] == demo.filter_stats["kept"]
    sources = {s.name: s.data for s in demo.stages}
    assert sources == {"first-stage": "image shards", "base": "latent shards",
                       "inpainting": "latent shards", "v": "image shards"}  # fmt: skip
    for stage, latent in (("base", True), ("inpainting", True), ("v", False)):
        cfg = stage_config(stage, ["data.shards=x"])
        saved = (demo.out / stage / "config.yaml").read_text()
        assert f"latents: {'true' if latent else 'false'}" in saved, stage
        assert cfg.data.latents is False  # the shipped configs read images; the demo switches
    # the report gives each UNet stage's step time and the measured ratio it makes
    ratio = demo.latents["step_cpu_ratio_images_over_latents"]
    assert ratio > 0
    report = demo.report.read_text()
    assert f"takes {ratio:.2f}x the CPU time" in report
    for stage in demo.stages[1:]:
        wall, cpu = stage.step_seconds
        assert wall > 0 and cpu > 0, stage.name


def test_the_v_stage_trains_on_non_square_scenes_in_aspect_ratio_buckets(
    demo: DemoResult,
) -> None:
    """Issue 15 §5: one of the demo's data sets is non-square, so that buckets are used."""
    buckets = demo.buckets
    assert sorted(buckets["buckets"]) == ["32x32", "32x48", "48x32"], buckets
    assert all(n > 0 for n in buckets["buckets"].values()), buckets
    assert 0 < sum(buckets["buckets"].values()) <= buckets["kept"] < buckets["samples"]
    saved = (demo.out / "v" / "config.yaml").read_text()
    assert "shards-wide" in saved and "enabled: true" in saved
    v = next(s for s in demo.stages if s.name == "v")
    assert len(v.bucket_step_seconds) >= 2, v.bucket_step_seconds  # several shapes trained
    report = demo.report.read_text()
    assert "| bucket (W x H) | samples |" in report
    for name, count in buckets["buckets"].items():
        assert f"| {name} | {count} |" in report


# ---------------------------------------------------------------------------------------------
# Did it learn?
# ---------------------------------------------------------------------------------------------


def test_dominant_colour_reads_drawn_scenes() -> None:
    for colour in SCENE_COLOURS:
        for kind in SCENE_SHAPES:
            image = np.asarray(draw(Scene((SceneShape(colour, kind, 0.5, 0.5, 0.12),), ""), 32))
            assert dominant_colour(image) == colour
    assert dominant_colour(np.full((32, 32, 3), 255, np.uint8)) is None


def test_samples_follow_the_colour_named_in_the_prompt(demo: DemoResult) -> None:
    model = model_of(demo, "base")
    colours = list(SCENE_COLOURS)
    prompts = [
        f"a large {colour} {kind} in the middle on a white background"
        for colour in colours
        for kind in SCENE_SHAPES
    ]
    truth = [colour for colour in colours for _ in SCENE_SHAPES]
    hits = 0
    for seed in (11, 12):
        images = to_uint8(sample_images(model, prompts, steps=25, scale=5.0, seed=seed, size=32))
        hits += sum(dominant_colour(image) == c for image, c in zip(images, truth, strict=True))
    accuracy = hits / (2 * len(prompts))
    chance = 1 / len(colours)
    assert accuracy >= 0.6, f"colour accuracy {accuracy:.2f} (chance {chance:.2f})"


def test_inpainting_repaints_the_mask_and_keeps_the_rest(demo: DemoResult) -> None:
    model = model_of(demo, "inpainting")
    inside, outside, free, hits, painted = [], [], [], 0, 0
    for seed in (100, 200):
        for i, case in enumerate(INPAINT_CASES):
            image, mask = case_inputs(case, 32)
            repaint = mask[0, 0].numpy() > 0.5
            before = to_uint8(image)[0]
            kwargs = dict(image=image, steps=25, scale=5.0, seed=seed + i, size=32)
            result = to_uint8(
                sample_images(model, [case.prompt], mask=mask, keep_unmasked=True, **kwargs)
            )[0]
            changed, kept = region_differences(before, result, repaint)
            inside.append(changed)
            outside.append(kept)
            if case.paints is not None:
                painted += 1
                hits += masked_colour(result, repaint) == case.paints
            # the whole picture repainted from the prompt: how far "keeping nothing" lands
            whole = sample_images(model, [case.prompt], mask=torch.ones_like(mask), **kwargs)
            free.append(region_differences(before, to_uint8(whole)[0], repaint)[1])
    changed, kept, baseline = np.mean(inside), np.mean(outside), np.mean(free)
    figures = (
        f"masked {changed:.1f}, unmasked {kept:.1f}, unmasked when all is repainted "
        f"{baseline:.1f}, colour painted as prompted {hits}/{painted}"
    )
    assert changed >= 20, figures  # the masked region was repainted ...
    assert kept <= 15 and kept < 0.5 * changed, figures  # ... and the rest stayed close
    assert kept < 0.75 * baseline, figures
    # what is painted follows the prompt well above chance (1 in 4 colours)
    assert hits / painted >= 0.5, figures


def test_the_eval_stage_tables_both_models_over_guidance_scales(
    demo: DemoResult, tmp_path: Path
) -> None:
    """``--quick`` leaves the eval stage out (its report says so); the full demo's stage, run
    here on the quick run's exported models at two scales."""
    from dataclasses import replace

    from sdtrain.launch.demo import PLANS, Demo

    assert not PLANS["quick"].eval_scales and PLANS["full"].eval_scales
    assert not demo.eval and "Left out of `--quick`" in demo.report.read_text()
    stage = Demo(tmp_path, quick=True)
    stage.plan = replace(stage.plan, eval_scales=(1.0, 5.0))
    stage.result = replace(demo, out=tmp_path)
    (tmp_path / "shards").symlink_to(demo.out / "shards")
    stage.evaluate()
    rows = stage.result.eval["rows"]
    assert sorted((r["stage"], r["scale"]) for r in rows) == [
        (s, c) for s in ("base", "v") for c in (1.0, 5.0)
    ]
    for row in rows:
        assert np.isfinite(row["distance"]) and row["distance"] >= 0
        assert row["colour_counted"] == 16 and 0 <= row["colour_hits"] <= 16
    table = stage.result.eval_markdown
    assert "random-feature FD" in table and "| FID" not in table
    assert "not FID" in stage.result.eval["features"]


def test_the_x4_upscaler_stage_is_the_full_demos_and_named_in_the_quick_report(
    demo: DemoResult,
) -> None:
    """Its claim (the trained x4 beats bicubic on held-out scenes) needs >= 250 steps, more than
    the quick demo's time goal allows: tests/test_demo_upscale.py trains it that far and checks
    it; here, that the full plan runs it and the quick report says it was left out."""
    from sdtrain.launch.demo import PLANS

    assert PLANS["full"].upscaler_steps >= 250 and not PLANS["quick"].upscaler_steps
    assert "upscaler" not in demo.exports and not demo.sections
    report = demo.report.read_text()
    assert "## x4 upscaler" in report and "Left out of `--quick`" in report


def test_the_x4_upscaler_trained_from_the_demos_first_stage_beats_bicubic(
    demo: DemoResult, tmp_path: Path
) -> None:
    """Issue 17 §4: the full demo's upscaler stage, run on the quick run's first-stage file and
    scenes for 300 steps (250 measured as the least that passes bicubic), against bicubic on
    held-out scenes (mean abs error, 0-255)."""
    from sdtrain.launch.demo_upscale import run_upscaler_stage

    up = run_upscaler_stage(demo.out / "shards", tmp_path,
                            first_stage_file=demo.exports["first-stage"],
                            scale_factor=demo.scale_factor, steps=300, sampling_steps=10,
                            seed=0)  # fmt: skip
    errors = up.mean_abs_error
    assert errors["sdtrain x4"] < errors["bicubic"], errors
    assert up.beats_bicubic
    section = up.markdown(relative_to=tmp_path)
    assert "## x4 upscaler" in section and up.grid.is_file()


def test_the_lora_stage_teaches_the_quick_base_a_star_and_keeps_the_class(
    demo: DemoResult, tmp_path: Path
) -> None:
    """``--quick`` leaves the LoRA stage out (its report says so); the full demo's stage, run
    here with its quick plan on the quick run's exported base."""
    from sdtrain.launch.demo import PLANS
    from sdtrain.launch.demo_lora import run_lora_stage
    from sdtrain.launch.demo_report import lora_section

    assert PLANS["full"].lora and not PLANS["quick"].lora
    assert not demo.lora and "lora" not in demo.exports
    report = demo.report.read_text()
    assert "## LoRA" in report and "teaches the base" in report
    lora = run_lora_stage(tmp_path, demo.exports["base"], demo.scale_factor, quick=True, seed=0)
    figures = f"star {lora.star_rate}, class {lora.class_rate}, chance {lora.chance}"
    assert lora.star_rate["after"] > lora.star_rate["before"], figures
    assert lora.star_rate["after"] > lora.chance, figures
    assert lora.class_rate["after"] >= 0.5, figures
    assert lora.export.is_file() and all(p.is_file() for p in lora.grids.values())
    section = lora_section(lora, tmp_path)
    assert "chance 0.25" in section and "samples/lora-after.png" in section


def test_an_earlier_demo_run_is_kept_unless_overwrite(tmp_path: Path) -> None:
    from sdtrain.config.errors import ConfigError

    (tmp_path / "base" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match="--overwrite"):
        run_demo(tmp_path, quick=True)
    assert (tmp_path / "base" / "checkpoints").is_dir()


def test_overwrite_removes_the_earlier_demo_run_first(tmp_path: Path, monkeypatch) -> None:
    from sdtrain.launch import demo as demo_module

    old = tmp_path / "shards" / "00000.tar"
    old.parent.mkdir()
    old.write_bytes(b"earlier run")
    seen = []

    def run(self: demo_module.Demo) -> DemoResult:
        seen.append(list(self.out.iterdir()) if self.out.exists() else [])
        return DemoResult(self.out, True, 0)

    monkeypatch.setattr(demo_module.Demo, "run", run)
    run_demo(tmp_path, quick=True, overwrite=True)
    assert seen == [[]] and not old.exists()
