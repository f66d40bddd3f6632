"""Inpainting mask generators: checked against the SD-1.5 and LaMa recipes over many samples.

Statistical checks use 4-sigma tolerances (binomial for shares, the sample spread for means), so
they fail on a wrong recipe and essentially never by chance; every draw is seeded.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import astuple

import cv2
import numpy as np
import pytest

from sdtrain.data.config import MaskConfig
from sdtrain.data.masks import (
    LAMA_BIG,
    SD15_PRESETS,
    MaskGenerator,
    MaskSample,
    build_mask_generator,
    mask_stats,
)

PRESETS = tuple(SD15_PRESETS)


def draw(cfg: MaskConfig, height: int, width: int, count: int, first: int = 0) -> list[MaskSample]:
    generator = build_mask_generator(cfg, height, width)
    return [generator(np.random.default_rng(seed)) for seed in range(first, first + count)]


def fractions(samples: list[MaskSample], kind: str | None = None) -> np.ndarray:
    return np.array([s.mask.mean() for s in samples if kind is None or s.kind == kind])


def assert_share(hits: int, total: int, p: float) -> None:
    """``hits / total`` is within 4 binomial sigmas of ``p``."""
    sigma = math.sqrt(p * (1 - p) / total)
    assert abs(hits / total - p) <= 4 * sigma + 1e-12, (hits, total, p)


def assert_same_mean(a: np.ndarray, b: np.ndarray) -> None:
    """The means of two independent samples agree within 4 sigmas of their difference."""
    sigma = math.sqrt(a.var() / len(a) + b.var() / len(b))
    assert abs(a.mean() - b.mean()) <= 4 * sigma, (a.mean(), b.mean(), sigma)


def uniform_moments(low: int, high: int) -> tuple[float, float]:
    """Mean and second moment of a uniform integer in the inclusive range [low, high]."""
    mean = (low + high) / 2
    return mean, mean**2 + ((high - low + 1) ** 2 - 1) / 12


# ---------------------------------------------------------------------------------------------
# Shape, values, determinism, full masks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "preset", "height", "width"),
    [
        ("sd15", "256train", 256, 256),
        ("sd15", "512train", 512, 512),
        ("sd15", "512train-large", 256, 384),
        ("sd15", "512train-large", 512, 768),
        ("lama", "512train-large", 256, 384),
        ("lama", "512train-large", 384, 256),
    ],
)
def test_masks_are_binary_uint8_of_the_image_size(
    kind: str, preset: str, height: int, width: int
) -> None:
    cfg = MaskConfig(kind=kind, preset=preset, lama_weights=[1.0, 1.0, 1.0])
    for sample in draw(cfg, height, width, 200):
        assert sample.mask.shape == (height, width)
        assert sample.mask.dtype == np.uint8
        assert set(np.unique(sample.mask)) <= {0, 1}
        assert sample.mask.any()


@pytest.mark.parametrize("kind", ["sd15", "lama"])
def test_same_seed_same_mask_different_seed_different_mask(kind: str) -> None:
    cfg = MaskConfig(kind=kind, full_mask_p=0.0, lama_weights=[1.0, 1.0, 1.0])
    generator = MaskGenerator(cfg, 256, 256)
    for seed in range(50):
        first = generator(np.random.default_rng(seed))
        again = generator(np.random.default_rng(seed))
        other = generator(np.random.default_rng(seed + 1000))
        assert first.kind == again.kind
        np.testing.assert_array_equal(first.mask, again.mask)
        assert not np.array_equal(first.mask, other.mask)


@pytest.mark.parametrize("kind", ["sd15", "lama"])
def test_generator_survives_pickling_for_loader_workers(kind: str) -> None:
    generator = build_mask_generator(MaskConfig(kind=kind, full_mask_p=0.0), 64, 96)
    copy = pickle.loads(pickle.dumps(generator))
    for seed in range(10):
        expected = generator(np.random.default_rng(seed)).mask
        np.testing.assert_array_equal(copy(np.random.default_rng(seed)).mask, expected)


@pytest.mark.parametrize("kind", ["sd15", "lama"])
@pytest.mark.parametrize("full_mask_p", [0.0, 0.25, 1.0])
def test_share_of_full_masks_matches_full_mask_p(kind: str, full_mask_p: float) -> None:
    samples = draw(MaskConfig(kind=kind, full_mask_p=full_mask_p), 256, 256, 2000)
    full = [s for s in samples if s.kind == "full"]
    assert all(s.mask.all() for s in full)
    assert_share(len(full), len(samples), full_mask_p)
    assert mask_stats(samples)["full"] == len(full) / len(samples)


@pytest.mark.parametrize("kind", ["sd15", "lama"])
def test_full_mask_coin_is_drawn_first(kind: str) -> None:
    # The rest of the recipe keeps its draw order: a mask that is not full is the very mask the
    # same seed gives with full_mask_p = 0.
    with_full = build_mask_generator(MaskConfig(kind=kind, full_mask_p=0.5), 128, 128)
    without = build_mask_generator(MaskConfig(kind=kind, full_mask_p=0.0), 128, 128)
    for seed in range(100):
        sample = with_full(np.random.default_rng(seed))
        if sample.kind != "full":
            np.testing.assert_array_equal(sample.mask, without(np.random.default_rng(seed)).mask)


# ---------------------------------------------------------------------------------------------
# SD-1.5-inpainting recipe
# ---------------------------------------------------------------------------------------------


# The recipe table: (base, strokes, stroke length, stroke width, boxes, box side, margin).
SD15_TABLE = {
    "256train": (256, (1, 4), (10, 199), (5, 99), (1, 3), (30, 149), 10),
    "512train": (512, (1, 4), (10, 449), (5, 249), (1, 3), (30, 299), 10),
    "512train-large": (512, (1, 4), (10, 449), (5, 399), (1, 3), (75, 449), 10),
}


def test_registries_hold_the_documented_recipes() -> None:
    # The statistical tests below derive their bands from the registries, so pin those first.
    assert {name: astuple(preset) for name, preset in SD15_PRESETS.items()} == SD15_TABLE
    big_lama = (256, (1, 5), (1, 5), 4, 10, 200, 5, 100, (1, 4), (30, 149), 10, 0.5, (0.04, 0.25))
    assert astuple(LAMA_BIG) == big_lama


def test_sd15_strokes_and_boxes_are_fifty_fifty() -> None:
    samples = draw(MaskConfig(kind="sd15", preset="256train"), 256, 256, 2000)
    stats = mask_stats(samples)
    assert set(stats["kinds"]) == {"full", "strokes", "boxes"}
    partial = [s for s in samples if s.kind != "full"]
    assert_share(sum(s.kind == "strokes" for s in partial), len(partial), 0.5)


@pytest.fixture(scope="module")
def wide_large_boxes() -> list[np.ndarray]:
    """Box-only masks of the 512train-large preset on a 512 x 4096 canvas.

    The shorter side is the preset's base resolution, so box sizes are the preset's own numbers,
    while the long side leaves room for the 1-3 boxes to lie apart most of the time.
    """
    cfg = MaskConfig(kind="sd15", preset="512train-large", full_mask_p=0.0)
    return [s.mask for s in draw(cfg, 512, 4096, 800) if s.kind == "boxes"]


def single_boxes(mask: np.ndarray) -> tuple[int, list[np.ndarray]]:
    """The number of components and the crops of those that are one box.

    A box, rounded or not, is symmetric under both flips within its bounding box; boxes merged
    into one component (almost surely) are not.
    """
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
    crops = []
    for label in range(1, count):  # label 0 is the background
        left, top, width, height, _ = stats[label]
        crop = labels[top : top + height, left : left + width] == label
        if np.array_equal(crop, crop[::-1]) and np.array_equal(crop, crop[:, ::-1]):
            crops.append(crop)
    return count - 1, crops


def test_sd15_large_box_count_and_sizes_follow_the_preset(
    wide_large_boxes: list[np.ndarray],
) -> None:
    preset = SD15_PRESETS["512train-large"]
    low, high = preset.box_side
    counts, sides, solid = [], [], []
    for mask in wide_large_boxes:
        count, crops = single_boxes(mask)
        counts.append(count)
        for crop in crops:
            sides += crop.shape
            solid.append(bool(crop.all()))
    counts = np.array(counts)
    # Never more components than boxes; each count of the preset's 1-3 shows up often.
    assert counts.min() == preset.box_count[0] and counts.max() == preset.box_count[1]
    assert all(np.mean(counts == n) > 0.15 for n in (1, 2, 3))
    assert low <= min(sides) < low + 10 and high - 10 < max(sides) <= high
    # Half of the boxes are rounded (a radius under 1 px, for ~1% of them, leaves a rectangle).
    assert_share(sum(solid), len(solid), 0.5)


@pytest.mark.parametrize(
    ("preset", "height", "width"), [("512train-large", 512, 512), ("256train", 256, 384)]
)
def test_sd15_boxes_keep_the_margin(preset: str, height: int, width: int) -> None:
    margin = SD15_PRESETS[preset].margin * min(height, width) // SD15_PRESETS[preset].base
    cfg = MaskConfig(kind="sd15", preset=preset, full_mask_p=0.0)
    boxes = [s.mask for s in draw(cfg, height, width, 400) if s.kind == "boxes"]
    assert len(boxes) > 100
    for mask in boxes:
        border = np.ones_like(mask, dtype=bool)
        border[margin:-margin, margin:-margin] = False
        assert not mask[border].any()


def sd15_bands(preset_name: str, side: int) -> dict[str, tuple[float, float]]:
    """Bounds on the mean masked fraction of each kind, from the preset numbers alone.

    Boxes: the union of 1-3 boxes covers at least the first box (less at most 1 - pi/4 of its
    area when rounded, which half are) and at most the sum of the boxes. Strokes: each stroke is
    at most a capsule L x W plus a disc of diameter W; the first one keeps at least a quarter of
    the disc around its start point, which lies inside the image.
    """
    preset = SD15_PRESETS[preset_name]
    scale, area = side / preset.base, side * side
    side_mean, _ = uniform_moments(*preset.box_side)
    one_box = (side_mean * scale) ** 2 / area
    mean_boxes, _ = uniform_moments(*preset.box_count)
    length, _ = uniform_moments(*preset.stroke_length)
    width, width_sq = uniform_moments(*preset.stroke_width)
    capsule = (length * width + math.pi / 4 * width_sq) * scale**2 / area
    mean_strokes, _ = uniform_moments(*preset.stroke_count)
    return {
        "boxes": (one_box * (1 - 0.5 * (1 - math.pi / 4)), min(1.0, mean_boxes * one_box)),
        "strokes": (math.pi / 16 * width_sq * scale**2 / area, min(1.0, mean_strokes * capsule)),
    }


@pytest.mark.parametrize(
    ("preset", "side", "count"),
    [("256train", 256, 2000), ("512train", 512, 400), ("512train-large", 512, 400)],
)
def test_sd15_masked_fraction_is_inside_the_recipe_band(preset: str, side: int, count: int) -> None:
    samples = draw(MaskConfig(kind="sd15", preset=preset, full_mask_p=0.0), side, side, count)
    for kind, (low, high) in sd15_bands(preset, side).items():
        values = fractions(samples, kind)
        assert low < values.mean() < high, (kind, values.mean(), low, high)
        # Sizes and counts vary a lot within the recipe: masks are neither all alike nor bimodal.
        assert 0.05 < values.std() < 0.3, (kind, values.std())
        assert (values > 0).all() and (values < 1).all()


def test_sd15_large_preset_masks_more_than_256train() -> None:
    cfg = MaskConfig(kind="sd15", full_mask_p=0.0)
    small = fractions(
        draw(MaskConfig(kind="sd15", preset="256train", full_mask_p=0.0), 512, 512, 300)
    )
    large = fractions(draw(cfg, 512, 512, 300))
    sigma = math.sqrt(small.var() / len(small) + large.var() / len(large))
    assert large.mean() - small.mean() > 4 * sigma


def test_sd15_masked_fraction_does_not_depend_on_resolution() -> None:
    cfg = MaskConfig(kind="sd15", preset="512train-large", full_mask_p=0.0)
    assert_same_mean(
        fractions(draw(cfg, 512, 512, 400)), fractions(draw(cfg, 1024, 1024, 200, 400))
    )


# ---------------------------------------------------------------------------------------------
# LaMa mixed recipe
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [[1.0, 2.0, 1.0], [1.0, 1.0, 0.0]])
def test_lama_kind_shares_follow_the_weights(weights: list[float]) -> None:
    samples = draw(MaskConfig(kind="lama", full_mask_p=0.0, lama_weights=weights), 128, 128, 2000)
    for kind, weight in zip(("irregular", "box", "outpainting"), weights, strict=True):
        assert_share(sum(s.kind == kind for s in samples), len(samples), weight / sum(weights))


def test_lama_outpainting_masks_are_border_frames() -> None:
    cfg = MaskConfig(kind="lama", full_mask_p=0.0, lama_weights=[0.0, 0.0, 1.0])
    low, high = LAMA_BIG.outpaint_fraction
    height, width = 256, 384
    for sample in draw(cfg, height, width, 500):
        mask = sample.mask
        assert sample.kind == "outpainting"
        # No side pads more than a quarter of its dimension, so the centre is always kept.
        assert not mask[height // 4 : -height // 4, width // 4 : -width // 4].any()
        pads = [
            int(mask[height // 2, :].argmin()),  # left: leading ones along the middle row
            int(mask[:, width // 2].argmin()),  # top
            int(mask[height // 2, ::-1].argmin()),  # right
            int(mask[::-1, width // 2].argmin()),  # bottom
        ]
        assert any(pads)  # at least one border is padded
        for pad, extent in zip(pads, (width, height, width, height), strict=True):
            assert pad == 0 or low * extent - 1 <= pad <= high * extent + 1
        frame = np.zeros_like(mask)
        frame[:, : pads[0]] = frame[: pads[1], :] = 1
        frame[:, width - pads[2] :] = frame[height - pads[3] :, :] = 1
        np.testing.assert_array_equal(mask, frame)


def test_lama_boxes_follow_big_lama_sizes_and_margin() -> None:
    cfg = MaskConfig(kind="lama", full_mask_p=0.0, lama_weights=[0.0, 1.0, 0.0])
    low, high = LAMA_BIG.box_side
    margin = LAMA_BIG.margin
    counts = []
    for sample in draw(cfg, 256, 256, 500):
        mask = sample.mask
        assert not (mask[:margin].any() or mask[-margin:].any())
        assert not (mask[:, :margin].any() or mask[:, -margin:].any())
        count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
        counts.append(count - 1)
        for _, _, width, height, area in stats[1:]:
            assert min(width, height) >= low
            assert area < width * height or max(width, height) <= high  # lone boxes are rectangles
    assert set(counts) <= set(range(1, LAMA_BIG.box_count[1] + 1))


def test_lama_irregular_masked_fraction_does_not_depend_on_resolution() -> None:
    cfg = MaskConfig(kind="lama", full_mask_p=0.0, lama_weights=[1.0, 0.0, 0.0])
    at_256 = fractions(draw(cfg, 256, 256, 1500))
    at_512 = fractions(draw(cfg, 512, 512, 400, 1500))
    assert_same_mean(at_256, at_512)
    assert 0.2 < at_256.mean() < 0.7


# ---------------------------------------------------------------------------------------------
# Small images, stats
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd15", "lama"])
@pytest.mark.parametrize("preset", PRESETS)
def test_tiny_images_still_get_sensible_masks(kind: str, preset: str) -> None:
    cfg = MaskConfig(kind=kind, preset=preset, full_mask_p=0.0, lama_weights=[1.0, 1.0, 1.0])
    values = fractions(draw(cfg, 64, 64, 300))
    assert (values > 0).all()
    assert 0.1 < values.mean() < 0.6


def test_mask_stats_summarises_kinds_and_fractions() -> None:
    ones, zeros = np.ones((4, 4), np.uint8), np.zeros((4, 4), np.uint8)
    half = np.zeros((4, 4), np.uint8)
    half[:2] = 1
    stats = mask_stats(
        [MaskSample(ones, "full"), MaskSample(half, "boxes"), MaskSample(zeros, "strokes")] * 2
    )
    assert stats["count"] == 6
    assert stats["mean"] == pytest.approx(0.5)
    assert stats["std"] == pytest.approx(math.sqrt(1 / 6))
    assert stats["full"] == pytest.approx(1 / 3)
    assert stats["kinds"] == pytest.approx({"boxes": 1 / 3, "full": 1 / 3, "strokes": 1 / 3})
    with pytest.raises(ValueError):
        mask_stats([])
