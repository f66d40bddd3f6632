"""Synthetic inpainting masks: the SD-1.5-inpainting recipe and LaMa's mixed generator.

A mask is a ``(H, W)`` uint8 array with 1 where the model repaints ("white for inpainting") and 0
where the image is kept; ``masked_image = image * (1 - mask)`` is computed by the loader.

Two recipes, chosen by ``MaskConfig.kind``:

- ``sd15``: the "large masks" recipe used to fine-tune SD-1.5-inpainting. Per sample, thick
  strokes or boxes (50/50). Stroke and box sizes come from a preset (``256train``, ``512train``,
  ``512train-large``) defined at the preset's base resolution.
- ``lama``: LaMa's mixed generator with the big-lama defaults at 256 px: one of irregular random
  walk strokes, boxes or outpainting borders per sample, picked with ``MaskConfig.lama_weights``.

Pixel sizes scale linearly with the shorter image side relative to the base resolution, so the
masked fraction is about the same at 256, 512 or 1024 px and the recipe still works at 64 px.

With probability ``full_mask_p`` the whole image is masked (pure text-to-image samples). That coin
is the first draw from the sample's generator, so everything else keeps its draw order. All
randomness comes from the ``np.random.Generator`` passed per call: the loader seeds one per sample
from (seed, sample identity), which makes masks reproducible across workers and restarts.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

import cv2
import numpy as np

from sdtrain.data.config import MaskConfig

# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------

IntRange = tuple[int, int]
"""An inclusive ``(low, high)`` range of integers."""


@dataclass(frozen=True)
class Sd15Preset:
    """One SD-1.5-inpainting preset; pixel sizes are at ``base`` px (the shorter image side)."""

    base: int
    stroke_count: IntRange
    stroke_length: IntRange
    stroke_width: IntRange
    box_count: IntRange
    box_side: IntRange
    margin: int


SD15_PRESETS: dict[str, Sd15Preset] = {
    "256train": Sd15Preset(
        base=256,
        stroke_count=(1, 4),
        stroke_length=(10, 199),
        stroke_width=(5, 99),
        box_count=(1, 3),
        box_side=(30, 149),
        margin=10,
    ),
    "512train": Sd15Preset(
        base=512,
        stroke_count=(1, 4),
        stroke_length=(10, 449),
        stroke_width=(5, 249),
        box_count=(1, 3),
        box_side=(30, 299),
        margin=10,
    ),
    "512train-large": Sd15Preset(
        base=512,
        stroke_count=(1, 4),
        stroke_length=(10, 449),
        stroke_width=(5, 399),
        box_count=(1, 3),
        box_side=(75, 449),
        margin=10,
    ),
}


@dataclass(frozen=True)
class LamaParams:
    """LaMa's mixed generator (big-lama training defaults); pixel sizes are at ``base`` px.

    The irregular walk adds ``randint(max_*)`` (exclusive) to the minimum, as LaMa does; the box
    side range is inclusive here, so ``(30, 149)`` is LaMa's ``randint(30, 150)``.
    """

    base: int = 256
    irregular_count: IntRange = (1, 5)
    segment_count: IntRange = (1, 5)
    max_angle: int = 4
    min_length: int = 10
    max_length: int = 200
    min_width: int = 5
    max_width: int = 100
    box_count: IntRange = (1, 4)
    box_side: IntRange = (30, 149)
    margin: int = 10
    outpaint_side_p: float = 0.5
    outpaint_fraction: tuple[float, float] = (0.04, 0.25)


LAMA_BIG = LamaParams()
LAMA_KINDS = ("irregular", "box", "outpainting")


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskSample:
    """One drawn mask and which part of the recipe drew it."""

    mask: np.ndarray
    """(H, W) uint8 in {0, 1}; 1 = repaint."""
    kind: str
    """``full``, ``strokes``, ``boxes`` (sd15) / ``full``, ``irregular``, ``box``, ``outpainting``
    (lama)."""


Drawer = Callable[[np.random.Generator, np.ndarray], str]
"""Draws one recipe into a zeroed mask and returns the kind it drew."""


class MaskGenerator:
    """Draws masks of one size from one ``MaskConfig``; stateless between calls."""

    def __init__(self, cfg: MaskConfig, height: int, width: int) -> None:
        if height < 1 or width < 1:
            raise ValueError(f"mask size must be positive, got {height}x{width}")
        self.cfg = cfg
        self.height = height
        self.width = width
        # The recipe is resolved once here so that __call__ is a plain draw with no branching.
        self._draw = _make_drawer(cfg, height, width)

    def __call__(self, rng: np.random.Generator) -> MaskSample:
        shape = (self.height, self.width)
        # Always drawn, even for p = 0 or 1, so the remaining draws never shift with full_mask_p.
        if rng.random() < self.cfg.full_mask_p:
            return MaskSample(np.ones(shape, dtype=np.uint8), "full")
        mask = np.zeros(shape, dtype=np.uint8)
        kind = self._draw(rng, mask)
        return MaskSample(mask, kind)


def build_mask_generator(cfg: MaskConfig, height: int, width: int) -> MaskGenerator:
    """The mask generator for images of ``height`` x ``width`` pixels."""
    return MaskGenerator(cfg, height, width)


def mask_stats(masks: Iterable[MaskSample]) -> dict:
    """Summary of many masks: ``count``, ``mean`` / ``std`` of the masked fraction, ``full``
    (share of whole-image masks) and ``kinds`` (share of each kind, sorted by name)."""
    fractions: list[float] = []
    kinds: Counter[str] = Counter()
    for sample in masks:
        fractions.append(float(sample.mask.mean()))
        kinds[sample.kind] += 1
    if not fractions:
        raise ValueError("mask_stats needs at least one mask")
    count = len(fractions)
    values = np.asarray(fractions)
    return {
        "count": count,
        "mean": float(values.mean()),
        "std": float(values.std()),
        "full": kinds["full"] / count,
        "kinds": {kind: kinds[kind] / count for kind in sorted(kinds)},
    }


def _make_drawer(cfg: MaskConfig, height: int, width: int) -> Drawer:
    # partial of module-level functions, not lambdas: DataLoader workers may pickle the generator.
    if cfg.kind == "sd15":
        preset = _scale_sd15(SD15_PRESETS[cfg.preset], min(height, width))
        return partial(_draw_sd15, preset=preset)
    if cfg.kind == "lama":
        params = _scale_lama(LAMA_BIG, min(height, width))
        weights = np.asarray(cfg.lama_weights, dtype=np.float64)
        return partial(_draw_lama, params=params, odds=weights / weights.sum())
    raise ValueError(f"unknown mask kind {cfg.kind!r}")


# ---------------------------------------------------------------------------------------------
# Scaling with resolution
# ---------------------------------------------------------------------------------------------


def _px(value: int, scale: float, minimum: int = 1) -> int:
    """A pixel size at the actual resolution; never below ``minimum`` so ranges stay non-empty."""
    return max(minimum, round(value * scale))


def _px_range(bounds: IntRange, scale: float) -> IntRange:
    low = _px(bounds[0], scale)
    return low, max(low, _px(bounds[1], scale))


def _scale_sd15(preset: Sd15Preset, side: int) -> Sd15Preset:
    scale = side / preset.base
    return Sd15Preset(
        base=side,
        stroke_count=preset.stroke_count,
        stroke_length=_px_range(preset.stroke_length, scale),
        stroke_width=_px_range(preset.stroke_width, scale),
        box_count=preset.box_count,
        box_side=_px_range(preset.box_side, scale),
        margin=_px(preset.margin, scale, minimum=0),
    )


def _scale_lama(params: LamaParams, side: int) -> LamaParams:
    scale = side / params.base
    return LamaParams(
        base=side,
        irregular_count=params.irregular_count,
        segment_count=params.segment_count,
        max_angle=params.max_angle,
        min_length=_px(params.min_length, scale),
        max_length=_px(params.max_length, scale),
        min_width=_px(params.min_width, scale),
        max_width=_px(params.max_width, scale),
        box_count=params.box_count,
        box_side=_px_range(params.box_side, scale),
        margin=_px(params.margin, scale, minimum=0),
        outpaint_side_p=params.outpaint_side_p,
        outpaint_fraction=params.outpaint_fraction,
    )


# ---------------------------------------------------------------------------------------------
# SD-1.5-inpainting recipe
# ---------------------------------------------------------------------------------------------


def _draw_sd15(rng: np.random.Generator, mask: np.ndarray, preset: Sd15Preset) -> str:
    if rng.random() < 0.5:
        _draw_strokes(rng, mask, preset)
        return "strokes"
    count = _randint(rng, preset.box_count)
    _draw_boxes(rng, mask, count, preset.box_side, preset.margin, rounded_p=0.5)
    return "boxes"


def _draw_strokes(rng: np.random.Generator, mask: np.ndarray, preset: Sd15Preset) -> None:
    height, width = mask.shape
    point = _random_point(rng, height, width)
    for index in range(_randint(rng, preset.stroke_count)):
        # Half of the later strokes continue the previous one, giving longer connected scribbles.
        if index > 0 and rng.random() >= 0.5:
            point = _random_point(rng, height, width)
        angle = rng.uniform(0.0, 2.0 * math.pi)
        length = _randint(rng, preset.stroke_length)
        thickness = _randint(rng, preset.stroke_width)
        end = _endpoint(point, angle, length)
        # Drawn unclipped (cv2 clips the pixels) so strokes leaving the image keep their
        # direction; only the point a continuing stroke starts from is pulled back inside.
        # cv2.line draws round caps on thick lines, so continued strokes join without notches.
        cv2.line(mask, point, end, 1, thickness)
        point = _clip(end, height, width)


def _draw_boxes(
    rng: np.random.Generator,
    mask: np.ndarray,
    count: int,
    side: IntRange,
    margin: int,
    rounded_p: float,
) -> None:
    height, width = mask.shape
    for _ in range(count):
        box_h, top = _place(rng, side, height, margin)
        box_w, left = _place(rng, side, width, margin)
        radius = 0
        if rng.random() < rounded_p:
            radius = int(rng.uniform(0.0, 0.5) * min(box_h, box_w))
        _fill_box(mask, top, left, box_h, box_w, radius)


def _place(rng: np.random.Generator, side: IntRange, extent: int, margin: int) -> tuple[int, int]:
    """Length and start of one box side, keeping ``margin`` free on both ends where it fits."""
    margin = min(margin, (extent - 1) // 2)
    room = extent - 2 * margin
    length = _randint(rng, (min(side[0], room), min(side[1], room)))
    start = margin + int(rng.integers(0, room - length + 1))
    return length, start


def _fill_box(mask: np.ndarray, top: int, left: int, height: int, width: int, radius: int) -> None:
    if radius < 1:
        mask[top : top + height, left : left + width] = 1
        return
    # A rounded box: a cross of two rectangles plus a filled circle in each corner.
    mask[top + radius : top + height - radius, left : left + width] = 1
    mask[top : top + height, left + radius : left + width - radius] = 1
    for y in (top + radius, top + height - 1 - radius):
        for x in (left + radius, left + width - 1 - radius):
            cv2.circle(mask, (x, y), radius, 1, thickness=-1)


# ---------------------------------------------------------------------------------------------
# LaMa mixed recipe
# ---------------------------------------------------------------------------------------------


def _draw_lama(
    rng: np.random.Generator, mask: np.ndarray, params: LamaParams, odds: np.ndarray
) -> str:
    kind = LAMA_KINDS[int(rng.choice(len(LAMA_KINDS), p=odds))]
    if kind == "irregular":
        _draw_irregular(rng, mask, params)
    elif kind == "box":
        count = _randint(rng, params.box_count)
        _draw_boxes(rng, mask, count, params.box_side, params.margin, rounded_p=0.0)
    else:
        _draw_outpainting(rng, mask, params)
    return kind


def _draw_irregular(rng: np.random.Generator, mask: np.ndarray, params: LamaParams) -> None:
    height, width = mask.shape
    for walk in range(_randint(rng, params.irregular_count)):
        point = _random_point(rng, height, width)
        for _ in range(_randint(rng, params.segment_count)):
            # Integer radians plus 0.01, mirrored on every other walk, as in LaMa.
            angle = 0.01 + int(rng.integers(params.max_angle))
            if walk % 2 == 0:
                angle = 2.0 * math.pi - angle
            length = params.min_length + int(rng.integers(params.max_length))
            thickness = params.min_width + int(rng.integers(params.max_width))
            # LaMa clips the end point before drawing, bending segments that leave the image.
            end = _clip(_endpoint(point, angle, length), height, width)
            cv2.line(mask, point, end, 1, thickness)
            point = end


def _draw_outpainting(rng: np.random.Generator, mask: np.ndarray, params: LamaParams) -> None:
    height, width = mask.shape
    padded = rng.random(4) < params.outpaint_side_p
    if not padded.any():
        padded[int(rng.integers(4))] = True
    low, high = params.outpaint_fraction
    fractions = rng.uniform(low, high, size=4)
    left, top, right, bottom = (
        max(1, round(fraction * extent))
        for fraction, extent in zip(fractions, (width, height, width, height), strict=True)
    )
    if padded[0]:
        mask[:, :left] = 1
    if padded[1]:
        mask[:top, :] = 1
    if padded[2]:
        mask[:, width - right :] = 1
    if padded[3]:
        mask[height - bottom :, :] = 1


# ---------------------------------------------------------------------------------------------
# Drawing helpers
# ---------------------------------------------------------------------------------------------


def _randint(rng: np.random.Generator, bounds: IntRange) -> int:
    """A uniform integer in the inclusive range ``bounds``."""
    return int(rng.integers(bounds[0], bounds[1] + 1))


def _random_point(rng: np.random.Generator, height: int, width: int) -> tuple[int, int]:
    return int(rng.integers(width)), int(rng.integers(height))


def _endpoint(start: tuple[int, int], angle: float, length: int) -> tuple[int, int]:
    """The end (x, y) of a segment of ``length`` px from ``start`` at ``angle`` radians."""
    return round(start[0] + length * math.cos(angle)), round(start[1] + length * math.sin(angle))


def _clip(point: tuple[int, int], height: int, width: int) -> tuple[int, int]:
    return min(max(point[0], 0), width - 1), min(max(point[1], 0), height - 1)
