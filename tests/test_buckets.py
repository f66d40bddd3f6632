"""Aspect-ratio buckets (``data.buckets``, issue 15 section 2): the generated set against its
closed form, nearest-ratio assignment, cover-resize / crop against hand computations, one bucket
per batch (masks and depth maps at the bucket's size), exact resumption of the bucket buffers
(in-process, and SIGKILL + ``resume=auto`` ending bit-identical), config errors, ``data stats
--buckets`` and short fits on non-square images."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_training import (
    final_weights,
    fit_command,
    in_process_cfg,
    kill_at_checkpoint,
    metrics,
    run_fit,
)

from sdtrain.data.buckets import Bucket, BucketConfig, BucketSet, cover_scale, generate_buckets
from sdtrain.data.config import DataConfig, FilterConfig, ImageConfig, MaskConfig
from sdtrain.data.config import DepthConfig as DataDepthConfig
from sdtrain.data.pipeline import LaionLoader
from sdtrain.data.shards import expand_shards, iter_samples
from sdtrain.data.synthetic import (
    SceneSpec,
    SyntheticSpec,
    write_scene_shards,
    write_synthetic_shards,
)
from sdtrain.data.transforms import image_size, plan_crop
from sdtrain.data.writer import ShardWriter
from sdtrain.errors import ConfigError
from sdtrain.launch.cli import EXIT_OK, EXIT_USAGE, main
from sdtrain.launch.data_cli import load_data_config

B = Bucket
EXPERIMENTS = Path(__file__).resolve().parents[1] / "configs" / "experiments"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """Photo-like JPEGs 64-96 px on the long side, short side 0.6-1.0 of it, either way up."""
    out = tmp_path_factory.mktemp("bucket-shards")
    write_synthetic_shards(out, SyntheticSpec(samples=48, per_shard=12, min_side=64, max_side=96))
    return str(out)


def bucket_cfg(shards: str, **changes) -> DataConfig:
    base = dict(
        shards=[shards] if shards else [], batch_size=3, num_workers=0, shuffle_buffer=8,
        resampled=False,
        image=ImageConfig(size=64), filters=FilterConfig(min_size=0),
        buckets=BucketConfig(enabled=True, step=16),
    )  # fmt: skip
    return DataConfig(**{**base, **changes})


def json_sizes(shards: str) -> dict[str, tuple[int, int]]:
    """key -> (width, height) as the json says."""
    sizes = {}
    for url in expand_shards([shards]):
        for raw in iter_samples(url):
            meta = json.loads(raw.members["json"])
            sizes[raw.key] = (meta["width"], meta["height"])
    return sizes


# ---------------------------------------------------------------------------------------------
# The bucket set, assignment, cover scale
# ---------------------------------------------------------------------------------------------


def test_generated_set_is_the_closed_form() -> None:
    # 512 px, 64 px steps: short side t, long side floor(512^2 / (64 t)) * 64, ratio in [1/2, 2]
    # t=384 -> 640, t=448 -> 576, t=512 -> 512 (t=320 -> 768 is 1:2.4, out of range).
    assert generate_buckets(512 * 512, 64) == [
        B(384, 640), B(448, 576), B(512, 512), B(576, 448), B(640, 384)
    ]  # fmt: skip
    # 64 px, 16 px steps: t=48 -> floor(4096 / 768) * 16 = 80; t=32 -> 128 is 4:1, out.
    assert generate_buckets(64 * 64, 16) == [B(48, 80), B(64, 64), B(80, 48)]
    # 768 px, 64 px steps: t=512 -> floor(589824 / 32768) * 64 = 1152 is 2.25:1, out;
    # t=576 -> 16 * 64 = 1024, t=640 -> 14 * 64 = 896, t=704 -> 13 * 64 = 832, t=768 -> 768
    found = generate_buckets(768 * 768, 64)
    assert found == [B(576, 1024), B(640, 896), B(704, 832), B(768, 768), B(832, 704),
                     B(896, 640), B(1024, 576)]  # fmt: skip
    for b in found:
        assert b.width % 64 == 0 and b.height % 64 == 0
        assert 0.5 <= b.ratio <= 2 and b.width * b.height <= 768 * 768
        assert (b.width + 64) * b.height > 768 * 768 or (b.height + 64) * b.width > 768 * 768
        assert B(b.height, b.width) in found  # both orientations
    # a narrower range drops the extreme ones
    assert generate_buckets(512 * 512, 64, 0.7, 1.43) == [B(448, 576), B(512, 512), B(576, 448)]


def test_an_explicit_list_replaces_the_generated_set() -> None:
    cfg = BucketConfig(enabled=True, sizes=[[768, 512], [512, 512], [512, 768], [512, 512]])
    assert BucketSet(cfg, 512, 512).buckets == [B(512, 768), B(512, 512), B(768, 512)]


def test_each_sample_goes_to_the_nearest_ratio_and_the_upscale_cap_drops() -> None:
    buckets = BucketSet(BucketConfig(enabled=True), 512, 512)  # the five buckets above
    assert buckets.nearest(1000, 500) == B(640, 384)  # 2.0: 1.667 is nearest
    assert buckets.nearest(500, 1000) == B(384, 640)
    # 1.2: |ln 1.2 - ln(576/448)| = 0.069 < |ln 1.2 - ln 1| = 0.182
    assert buckets.nearest(600, 500) == B(576, 448)
    # 1.1: |ln 1.1| = 0.095 < |ln 1.1 - ln 1.2857| = 0.156
    assert buckets.nearest(550, 500) == B(512, 512)
    # distance in log ratio: 1:2 and 2:1 are as far from 1:1, so 1.5 (0.405) is nearer 1.667
    # (0.511, distance 0.105) than 1.2857 (0.251, distance 0.154)
    assert buckets.nearest(300, 200) == B(640, 384)
    # covering 640x384 from 300x200 needs max(640/300, 384/200) = 2.133 > 2: dropped
    assert cover_scale(B(640, 384), 300, 200) == pytest.approx(640 / 300)
    assert buckets.place(300, 200) is None
    assert buckets.place(1200, 800) == B(640, 384)  # downscaled: always fine
    capped = BucketSet(BucketConfig(enabled=True, max_upscale=1.0), 512, 512)
    assert capped.place(639, 384) is None and capped.place(640, 384) == B(640, 384)


def test_cover_resize_and_crop_match_a_hand_computation() -> None:
    # 300x200 (w x h) into a 160x96 bucket: 96 * 300 < 160 * 200, so the width binds: the image
    # is resized to 160 x round(200 * 160 / 300) = 160 x 107 and cropped 96 high, centred at
    # top (107 - 96) // 2 = 5.
    info = plan_crop(200, 300, 96, 160, "center", 0.0, np.random.default_rng(0))
    assert info.crop_top_left == (5, 0)
    assert info.window == pytest.approx((5 * 200 / 107, 0, 96 * 200 / 107, 300))
    # a tall 200x400 image into 96x160 (w x h): height binds -> 96 wide? no: 160 * 200 < 96 * 400
    # means the width binds again: 96 x round(400 * 96 / 200) = 96 x 192, top (192 - 160) // 2
    info = plan_crop(400, 200, 160, 96, "center", 0.0, np.random.default_rng(0))
    assert info.crop_top_left == (16, 0)
    # random crops stay inside: top in [0, 107 - 96]
    tops = {plan_crop(200, 300, 96, 160, "random", 0.0, np.random.default_rng(s)).crop_top_left
            for s in range(200)}  # fmt: skip
    assert {t for t, _ in tops} == set(range(12)) and {left for _, left in tops} == {0}


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_loaded_crop_is_the_resized_image_cut_at_the_recorded_offset(tmp_path: Path) -> None:
    # One 300x200 PNG (no json: the bucket comes from the decoded header) into an explicit
    # 160x96 bucket; the output must equal resizing the whole image to 160x107 and cutting rows
    # 5..101, up to the resize's edge effects.
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:200, 0:300]
    array = np.stack([x * 255 // 300, y * 255 // 200, (x + y) % 256], -1).astype(np.uint8)
    array = np.clip(array + rng.integers(0, 4, array.shape), 0, 255).astype(np.uint8)
    with ShardWriter(tmp_path, per_shard=10) as writer:
        writer.write({"png": _png(array), "txt": "a gradient"})
    cfg = bucket_cfg(
        str(tmp_path), batch_size=1, image=ImageConfig(size=96, crop="center"),
        buckets=BucketConfig(enabled=True, sizes=[[160, 96], [96, 160]]),
    )  # fmt: skip
    (batch,) = list(LaionLoader(cfg))
    assert batch["bucket_size"].tolist() == [[96, 160]]  # (h, w)
    assert batch["original_size"].tolist() == [[200, 300]]
    assert batch["crop_top_left"].tolist() == [[5, 0]]
    whole = torch.from_numpy(array).permute(2, 0, 1)[None].float()
    resized = F.interpolate(whole, size=(107, 160), mode="bicubic", antialias=True)
    expected = resized[0, :, 5:101, :].round().clamp(0, 255)
    got = batch["image"][0].float()
    assert got.shape == expected.shape == (3, 96, 160)
    assert (got - expected).abs()[:, 2:-2, 2:-2].mean() < 1.5


def test_the_header_size_is_upright(tmp_path: Path) -> None:
    image = Image.fromarray(np.zeros((40, 80, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: upright it is 40 wide, 80 high
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert image_size(buffer.getvalue()) == (40, 80)
    assert image_size(_png(np.zeros((40, 80, 3), np.uint8))) == (80, 40)


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


def test_every_batch_holds_one_bucket_the_nearest_to_the_json_size(shards: str) -> None:
    sizes = json_sizes(shards)
    cfg = bucket_cfg(shards)
    buckets = BucketSet(cfg.buckets, 64, 64)
    per_bucket: Counter = Counter()
    for batch in LaionLoader(cfg):
        h, w = batch["image"].shape[-2:]
        assert all(tuple(s) == (h, w) for s in batch["bucket_size"].tolist())
        for key, original in zip(batch["key"], batch["original_size"].tolist(), strict=True):
            width, height = sizes[key]
            assert tuple(original) == (height, width)
            assert buckets.nearest(width, height) == B(int(w), int(h))
        per_bucket[B(int(w), int(h))] += len(batch["key"])
    # epoch mode: every sample once; the photo-like set has both orientations and squares
    assert sum(per_bucket.values()) == len(sizes) == 48
    assert set(per_bucket) == {B(48, 80), B(64, 64), B(80, 48)}


def test_full_batches_in_infinite_mode_with_two_workers(shards: str) -> None:
    cfg = bucket_cfg(shards, resampled=True, num_workers=2, batch_size=4)
    loader = iter(LaionLoader(cfg))
    shapes = set()
    for _ in range(12):
        batch = next(loader)
        assert batch["image"].shape[0] == 4
        shapes.add(tuple(batch["image"].shape[-2:]))
    assert len(shapes) >= 2


def _cover_crop(array: np.ndarray, out_h: int, out_w: int, top: int, left: int) -> np.ndarray:
    """Resize (H, W) floats to cover (out_h, out_w), aspect kept, and cut at (top, left)."""
    h, w = array.shape
    if out_h * w >= out_w * h:
        size = (out_h, max(out_w, round(w * out_h / h)))
    else:
        size = (max(out_h, round(h * out_w / w)), out_w)
    tensor = torch.from_numpy(array)[None, None]
    resized = F.interpolate(tensor, size=size, mode="bicubic", antialias=True)[0, 0]
    return resized[top : top + out_h, left : left + out_w].numpy()


def test_masks_and_depth_maps_come_at_the_bucket_size_cropped_with_the_image(
    tmp_path: Path,
) -> None:
    spec = SyntheticSpec(samples=12, per_shard=6, min_side=64, max_side=96, depth=True)
    write_synthetic_shards(tmp_path, spec)
    depth_maps = {
        raw.key: np.asarray(Image.open(io.BytesIO(raw.members["depth.png"])), np.float32)
        for url in expand_shards([str(tmp_path)])
        for raw in iter_samples(url)
    }
    cfg = bucket_cfg(
        str(tmp_path), masks=MaskConfig(enabled=True), depth=DataDepthConfig(enabled=True)
    )
    seen = set()
    for batch in LaionLoader(cfg):
        h, w = (int(x) for x in batch["image"].shape[-2:])
        seen.add((h, w))
        assert batch["mask"].shape[-2:] == (h, w) and batch["mask"].dtype == torch.uint8
        assert batch["depth"].shape[-2:] == (h, w)
        # the depth map cut where the image was (recorded offsets), normalised per sample
        for key, (top, left), depth in zip(
            batch["key"], batch["crop_top_left"].tolist(), batch["depth"][:, 0], strict=True
        ):
            expected = _cover_crop(depth_maps[key], h, w, top, left)
            low, high = expected.min(), expected.max()
            expected = 2 * (expected - low) / (high - low + 0.001) - 1
            assert np.abs(depth.numpy() - expected).mean() < 0.03
    assert len(seen) >= 2


def test_upscale_drops_are_counted(tmp_path: Path) -> None:
    # 32x32 images into 64x64 buckets need 2x: dropped with max_upscale 1.5, kept with 2
    with ShardWriter(tmp_path, per_shard=10) as writer:
        for i in range(4):
            side = 32 if i % 2 else 64
            image = np.full((side, side, 3), 100, np.uint8)
            meta = {"width": side, "height": side}
            writer.write({"png": _png(image), "txt": f"sample {i}", "json": meta})
    capped = bucket_cfg(str(tmp_path), batch_size=2,
                        buckets=BucketConfig(enabled=True, step=16, max_upscale=1.5))  # fmt: skip
    loader = LaionLoader(capped)
    kept = sum(len(b["key"]) for b in loader)
    assert kept == 2 and loader.stats.rejected["upscale"] == 2
    assert loader.stats.buckets == Counter({"64x64": 2})
    loose = LaionLoader(dataclasses.replace(capped, buckets=BucketConfig(enabled=True, step=16)))
    assert sum(len(b["key"]) for b in loose) == 4


# ---------------------------------------------------------------------------------------------
# Exact resumption
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_a_restored_loader_continues_with_exactly_the_next_batches(
    shards: str, workers: int
) -> None:
    cfg = bucket_cfg(shards, resampled=True, num_workers=workers, batch_size=4)
    straight = iter(LaionLoader(cfg, attach_state=True))
    batches = [next(straight) for _ in range(14)]
    states = [batch.pop("__loader_state__") for batch in batches]
    held = [sum(len(w["buckets"]) for w in s["workers"].values()) for s in states]
    # resume after a batch whose position holds samples in bucket buffers
    cut = next((i for i in range(3, 8) if held[i]), None)
    assert cut is not None, f"no bucket buffer held anything: {held}"
    resumed = iter(LaionLoader(cfg, state=states[cut]))
    for want in batches[cut + 1 :]:
        got = next(resumed)
        assert got["key"] == want["key"]
        assert torch.equal(got["image"], want["image"])
        assert torch.equal(got["crop_top_left"], want["crop_top_left"])


def test_sigkill_and_resume_with_buckets_is_bit_identical(shards: str, tmp_path: Path) -> None:
    # As test_training's SIGKILL test, with buckets on (an inpainting model: masks at the
    # bucket's size) and two dataloader workers.
    steps = ("trainer.max_steps=6", "checkpoint.every_n_steps=2", "data.num_workers=2",
             "data.buckets.enabled=true", "data.buckets.step=16")  # fmt: skip
    straight = tmp_path / "straight"
    run_fit("tiny-inpainting", shards, straight, *steps)

    killed = tmp_path / "killed"
    target = killed / "checkpoints" / "step=00000002.ckpt"
    kill_at_checkpoint(fit_command("tiny-inpainting", shards, killed, *steps), target)
    assert target.exists(), "the run never reached its step-2 checkpoint"
    assert not (killed / "checkpoints" / "step=00000006.ckpt").exists(), "killed too late"
    state = torch.load(target, weights_only=True)["sdtrain"]["data"][0]
    assert any(w["buckets"] for w in state["workers"].values()), "no bucket buffer to restore"
    run_fit("tiny-inpainting", shards, killed, *steps, "resume=auto")

    (unet_a, ema_a), (unet_b, ema_b) = final_weights(straight, 6), final_weights(killed, 6)
    assert unet_a.keys() == unet_b.keys() and ema_a.keys() == ema_b.keys()
    assert all(torch.equal(unet_a[k], unet_b[k]) for k in unet_a)
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


# ---------------------------------------------------------------------------------------------
# Config errors and the stats command
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sizes", "named"),
    [("[[512,512],[512,0]]", "entry 1 [512, 0]"), ("[[500,512]]", "entry 0 [500, 512]"),
     ("[[512]]", "entry 0 [512]")],
)  # fmt: skip
def test_a_bucket_side_that_is_zero_or_not_a_multiple_of_8_names_the_entry(
    sizes: str, named: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_data_config([], [f"data.buckets.sizes={sizes}"])
    assert caught.value.key == "data.buckets.sizes"
    assert named in str(caught.value)


def test_bucket_config_errors_through_the_cli(shards: str, capsys) -> None:
    code = main(["data", "stats", shards, "data.buckets.sizes=[[64,60]]", "--buckets"])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "Traceback" not in err
    assert "data.buckets.sizes" in err and "entry 0 [64, 60]" in err and "60" in err
    code = main(["data", "stats", shards, "data.buckets.step=12"])
    assert code == EXIT_USAGE and "data.buckets.step" in capsys.readouterr().err
    # an empty generated set is named too: at 64 px in 40 px steps the only bucket is 80x40
    # (floor(4096 / 1600) * 40 = 80), outside [0.9, 1.1]
    with pytest.raises(ConfigError) as caught:
        DataConfig(image=ImageConfig(size=64), buckets=BucketConfig(enabled=True, step=40,
                   min_ratio=0.9, max_ratio=1.1))  # fmt: skip
    assert caught.value.key == "buckets.step"


def test_buckets_the_unet_cannot_take_are_a_config_error_at_load() -> None:
    from sdtrain.trainer.experiment import load_config

    # tiny UNet: channel_mult [1, 2] -> one downsampling x the autoencoder's 8 = 16 px; at 64 px
    # an 8 px step gives 56x72 and 72x56 (floor(4096 / (56 * 8)) * 8 = 72)
    experiment = EXPERIMENTS / "tiny-base.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config([experiment], ["data.buckets.enabled=true", "data.buckets.step=8"])
    assert caught.value.key == "data.buckets.step" and "56x72, 72x56" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        load_config([experiment], ["data.buckets.enabled=true",
                                   "data.buckets.sizes=[[64,64],[72,56]]"])  # fmt: skip
    assert caught.value.key == "data.buckets.sizes" and "72x56" in str(caught.value)
    load_config([experiment], ["data.buckets.enabled=true", "data.buckets.step=16"])


def test_fit_dry_run_lists_the_buckets(shards: str, tmp_path: Path, capsys) -> None:
    argv = ["fit", "--config", str(EXPERIMENTS / "tiny-base.yaml"), f"data.shards=[{shards}]",
            f"run.dir={tmp_path}", "data.buckets.enabled=true", "data.buckets.step=16",
            "--dry-run"]  # fmt: skip
    assert main(argv) == EXIT_OK
    out = capsys.readouterr()
    assert "3 aspect-ratio bucket(s) (w x h): 48x80, 64x64, 80x48; up to 2x" in out.out + out.err


def test_data_stats_buckets_prints_counts_per_bucket_and_the_share_dropped(
    shards: str, capsys
) -> None:
    sizes = json_sizes(shards)
    # 80 px in 16 px steps: 64x96, 80x80, 96x64; the smaller images need more than 1.2x
    buckets = BucketSet(BucketConfig(enabled=True, step=16, max_upscale=1.2), 80, 80)
    expected: Counter = Counter()
    dropped = 0
    for width, height in sizes.values():
        bucket = buckets.place(width, height)
        if bucket is None:
            dropped += 1
        else:
            expected[bucket.name] += 1
    assert dropped and len(expected) >= 2  # the set exercises both
    argv = ["data", "stats", shards, "data.filters.min_size=0", "data.buckets.step=16",
            "data.buckets.max_upscale=1.2", "--size", "80", "--buckets"]  # fmt: skip
    assert main(argv) == EXIT_OK
    out = capsys.readouterr().out
    for name, count in expected.items():
        line = next(line for line in out.splitlines() if line.strip().startswith(name))
        assert int(line.split()[2]) == count, line
    placed = dropped + sum(expected.values())
    assert f"dropped:  {dropped} needing more than 1.2x upscale ({dropped / placed:.1%}" in out
    assert main([*argv, "--json"]) == EXIT_OK
    record = json.loads(capsys.readouterr().out)
    assert record["buckets"] == dict(expected) and record["rejected"]["upscale"] == dropped


def test_data_preview_rows_of_different_buckets_stack() -> None:
    from sdtrain.launch.data_cli import preview_rows

    samples = [
        {"image": torch.full((3, h, w), 200, dtype=torch.uint8), "key": str(i), "caption": "x"}
        for i, (h, w) in enumerate([(48, 80), (64, 64), (80, 48)])
    ]
    samples[1]["mask"] = torch.ones(1, 64, 64, dtype=torch.uint8)
    grid = np.asarray(preview_rows(samples))
    assert grid.shape == (48 + 64 + 80, 4 * 80, 3)  # columns as wide as the widest sample
    assert (grid[48:112, 80:144] == 255).all()  # row 2's mask panel: all white
    assert (grid[48:112, 160:224] == 128).all()  # ... and its masked image mid-grey


# ---------------------------------------------------------------------------------------------
# Training on non-square images
# ---------------------------------------------------------------------------------------------


def test_non_square_scene_shards(tmp_path: Path) -> None:
    spec = SceneSpec(samples=12, per_shard=12, side=64, aspect_ratios=[0.5, 1.0, 2.0],
                     reject_fraction=0.0, corrupt_fraction=0.0, seed=1)  # fmt: skip
    write_scene_shards(tmp_path, spec)
    sizes = Counter(json_sizes(str(tmp_path)).values())
    # 2.0 at 64 px: round(64 * sqrt 2 / 8) * 8 = 88 wide, round(64 / sqrt 2 / 8) * 8 = 48 high
    assert set(sizes) == {(88, 48), (64, 64), (48, 88)}
    for url in expand_shards([str(tmp_path)]):
        for raw in iter_samples(url):
            meta = json.loads(raw.members["json"])
            assert Image.open(io.BytesIO(raw.members["jpg"])).size == (
                meta["width"],
                meta["height"],
            )


def test_validation_references_from_bucketed_held_out_batches_are_square(
    shards: str, tmp_path: Path
) -> None:
    from sdtrain.trainer.validation import ValidationCallback

    cfg = in_process_cfg("tiny-inpainting", shards, tmp_path, "data.buckets.enabled=true",
                         "data.buckets.step=16", "data.batch_size=2",
                         f"validation.shards=[{shards}]")  # fmt: skip
    images, _ = ValidationCallback(cfg, tmp_path).reference_images(7, 64)  # from >= 4 batches
    assert images.shape == (7, 3, 64, 64)


def test_a_short_fit_on_non_square_images_with_square_validation(
    tmp_path: Path, shards: str
) -> None:
    from sdtrain.trainer.fit import fit

    cfg = in_process_cfg(
        "tiny-inpainting", shards, tmp_path / "run", "trainer.max_steps=2",
        "checkpoint.every_n_steps=2", "data.buckets.enabled=true", "data.buckets.step=16",
        "validation.every_n_steps=2", "validation.steps=2", "validation.samplers=[ddim]",
        f"validation.shards=[{shards}]", "validation.loss_batches=2", "validation.loss_buckets=1",
        "validation.prompts=[a red circle]",
    )  # fmt: skip
    seen = set()
    for batch, _ in zip(LaionLoader(cfg.data), range(6), strict=False):
        seen.add(tuple(batch["image"].shape[-2:]))
    assert len(seen) >= 2 and any(h != w for h, w in seen)
    fit(cfg)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "step=00000002.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    rows = metrics(tmp_path / "run")
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 2 and all(math.isfinite(x) and 0 < x < 10 for x in losses)
    assert any(r.get("val/loss") for r in rows)
    # one prompt, rows [input, mask, result] of square 64 px cells (validation stays square)
    grid = Image.open(tmp_path / "run" / "samples" / "step=00000002-ddim.png")
    assert grid.size == (64, 3 * 64)


# ---------------------------------------------------------------------------------------------
# Cached latents (sdtrain data encode) with buckets
# ---------------------------------------------------------------------------------------------


def test_encode_writes_each_sample_at_its_bucket_and_latent_batches_group_by_size(
    shards: str, tmp_path: Path
) -> None:
    from sdtrain.data.latents import MOMENTS, RECORD, LatentRecord
    from sdtrain.errors import DataError
    from sdtrain.trainer.fit import fit

    out = tmp_path / "latents"
    on = ["data.buckets.enabled=true", "data.buckets.step=16", "data.filters.min_size=0"]
    config = str(EXPERIMENTS / "tiny-base.yaml")
    assert main(["data", "encode", shards, str(out), "--config", config, *on]) == EXIT_OK
    sizes, buckets = json_sizes(shards), BucketSet(BucketConfig(enabled=True, step=16), 64, 64)
    stored = Counter()
    for url in expand_shards([str(out)]):
        for raw in iter_samples(url):
            record = LatentRecord.from_json(raw.members[RECORD])
            bucket = buckets.nearest(*sizes[raw.key])
            assert record.size == (bucket.height, bucket.width)
            moments = np.load(io.BytesIO(raw.members[MOMENTS]), allow_pickle=False)
            assert moments.shape == (8, bucket.height // 8, bucket.width // 8)
            stored[bucket] += 1
    assert sum(stored.values()) == 48 and len(stored) == 3

    cfg = in_process_cfg("tiny-base", str(out), tmp_path / "run", "data.latents=true", *on,
                         "trainer.max_steps=2", "checkpoint.every_n_steps=2")  # fmt: skip
    shapes = set()
    for batch, _ in zip(LaionLoader(cfg.data), range(8), strict=False):
        assert len({tuple(s) for s in batch["bucket_size"].tolist()}) == 1
        h, w = batch["bucket_size"][0].tolist()
        assert batch["moments"].shape[-2:] == (h // 8, w // 8)
        shapes.add((h, w))
    assert len(shapes) >= 2
    fit(cfg)
    assert (tmp_path / "run" / "checkpoints" / "step=00000002.ckpt").is_file()
    # the same latent shards without buckets: refused, naming the stored size
    plain = in_process_cfg("tiny-base", str(out), tmp_path / "plain", "data.latents=true",
                           "data.filters.min_size=0", "trainer.max_steps=1")  # fmt: skip
    with pytest.raises(DataError, match=r"encoded at \d+x\d+ px"):
        for _ in LaionLoader(plain.data):
            pass


# ---------------------------------------------------------------------------------------------
# The folder source (data.source: folder) with buckets
# ---------------------------------------------------------------------------------------------


def test_a_folder_of_non_square_images_batches_by_bucket_with_its_masks(tmp_path: Path) -> None:
    # 12 PNGs of 3 shapes, a .txt caption each; every third has a <name>.mask.png sidecar
    shapes = [(96, 48), (64, 64), (48, 96)]  # (w, h)
    for i in range(12):
        width, height = shapes[i % 3]
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8)).save(
            tmp_path / f"img{i}.png"
        )
        (tmp_path / f"img{i}.txt").write_text(f"picture {i}")
        if i % 4 == 0:  # left half to repaint
            mask = np.zeros((height, width), np.uint8)
            mask[:, : width // 2] = 255
            Image.fromarray(mask).save(tmp_path / f"img{i}.mask.png")
    cfg = bucket_cfg("", source="folder", folder=str(tmp_path), batch_size=2,
                     image=ImageConfig(size=64, crop="center"),
                     masks=MaskConfig(enabled=True))  # fmt: skip
    per_bucket: Counter = Counter()
    for batch in LaionLoader(cfg):
        h, w = (int(x) for x in batch["image"].shape[-2:])
        assert all(tuple(s) == (h, w) for s in batch["bucket_size"].tolist())
        assert batch["mask"].shape[-2:] == (h, w)
        for key, original, mask in zip(
            batch["key"], batch["original_size"].tolist(), batch["mask"][:, 0], strict=True
        ):
            i = int(key.rsplit("img", 1)[-1])
            assert tuple(original) == shapes[i % 3][::-1]
            if i % 4 == 0:  # the sidecar mask, cropped with the image: its left half
                assert mask[:, : w // 2 - 1].all() and not mask[:, w // 2 + 1 :].any()
        per_bucket[(w, h)] += len(batch["key"])
    # 2:1 goes to 80x48 (ratio 1.67), 1:1 to 64x64, 1:2 to 48x80
    assert per_bucket == Counter({(80, 48): 4, (64, 64): 4, (48, 80): 4})
