"""Synthetic LAION-style shards for tests, benchmarks and the demo: photo-like JPEGs with
img2dataset metadata, plus samples the filters must drop and samples that are broken on purpose.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from sdtrain.data.writer import ShardWriter


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth gradient with blurred shapes and mild noise: compresses like a photo."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            (np.sin(x / rng.uniform(40, 200) + rng.uniform(0, 6)) + 1) * 127,
            (np.cos(y / rng.uniform(40, 200) + rng.uniform(0, 6)) + 1) * 127,
            (x + y) / (width + height) * 255,
        ],
        axis=-1,
    )
    image = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.05, 0.3) * min(width, height)
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=color)
    image = image.filter(ImageFilter.GaussianBlur(radius=2))
    noise = rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling="4:2:0")
    return buffer.getvalue()


def depth_png(image: Image.Image) -> bytes:
    """A 16-bit PNG depth stand-in: the blurred luminance of ``image``, scaled to 0..65535."""
    luma = np.asarray(image.convert("L").filter(ImageFilter.GaussianBlur(4)), dtype=np.float64)
    depth = (luma / 255.0 * 65535).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(depth).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class SyntheticSpec:
    """What a synthetic shard set holds."""

    samples: int = 100
    per_shard: int = 25
    min_side: int = 512
    max_side: int = 1600
    """Long side range of the images (short side 0.6-1.0 of it)."""
    reject_fraction: float = 0.0
    """Share of samples whose metadata one of the default filters rejects."""
    corrupt_fraction: float = 0.0
    """Share of samples with a truncated JPEG."""
    depth: bool = False
    """Add a 16-bit ``depth.png`` member (a stand-in depth: the image's blurred luminance)."""
    seed: int = 0


def write_synthetic_shards(out_dir: str | Path, spec: SyntheticSpec) -> list[Path]:
    """Write the shards; sample ``i`` has caption ``"synthetic sample i"``."""
    rng = np.random.default_rng(spec.seed)
    reasons = ["aesthetic", "watermark", "unsafe", "size"]
    with ShardWriter(out_dir, per_shard=spec.per_shard) as writer:
        for i in range(spec.samples):
            long_side = int(rng.integers(spec.min_side, spec.max_side + 1))
            short_side = max(8, int(long_side * rng.uniform(0.6, 1.0)))
            width, height = (
                (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
            )
            meta = {
                "caption": f"synthetic sample {i}",
                "AESTHETIC_SCORE": round(float(rng.uniform(5.0, 7.5)), 3),
                "pwatermark": round(float(rng.uniform(0, 0.4)), 3),
                "punsafe": round(float(rng.uniform(0, 0.08)), 3),
                "original_width": width,
                "original_height": height,
                "width": width,
                "height": height,
            }
            if rng.random() < spec.reject_fraction:
                reason = reasons[int(rng.integers(len(reasons)))]
                if reason == "aesthetic":
                    meta["AESTHETIC_SCORE"] = 3.0
                elif reason == "watermark":
                    meta["pwatermark"] = 0.9
                elif reason == "unsafe":
                    meta["punsafe"] = 0.5
                else:
                    meta["original_width"] = meta["original_height"] = 200
            image = photo_like(rng, width, height)
            data = jpeg_bytes(image)
            if rng.random() < spec.corrupt_fraction:
                data = data[: len(data) // 3]
            members: dict[str, bytes | str | dict] = {
                "jpg": data,
                "txt": meta["caption"],
                "json": meta,
            }
            if spec.depth:
                members["depth.png"] = depth_png(image)
            writer.write(members)
    return writer.written


# ---------------------------------------------------------------------------------------------
# Captioned shape scenes (the data of `sdtrain demo`)
# ---------------------------------------------------------------------------------------------

SCENE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 205, 20),
}
"""The palette a scene's shapes are drawn from; captions name these words."""
SCENE_SHAPES = ("circle", "square", "triangle")
"""The shapes the demo's scenes draw; ``draw_scene`` also draws a ``star``, which no scene
holds (the shape the demo's LoRA stage teaches)."""
SCENE_PLACES = {  # where a lone shape sits: centre (x, y) as fractions of the side
    "at the top": (0.5, 0.27),
    "at the bottom": (0.5, 0.73),
    "on the left": (0.27, 0.5),
    "on the right": (0.73, 0.5),
    "in the middle": (0.5, 0.5),
}
SCENE_RELATIONS = {  # offset of the first shape from the second, as fractions of the side
    "above": (0.0, -0.46),
    "below": (0.0, 0.46),
    "to the left of": (-0.46, 0.0),
    "to the right of": (0.46, 0.0),
}


@dataclass(frozen=True)
class SceneShape:
    """One flat-coloured shape: centre and radius as fractions of the image side."""

    colour: str
    kind: str
    x: float
    y: float
    radius: float


@dataclass(frozen=True)
class Scene:
    """One or two shapes on white and the caption describing them."""

    shapes: tuple[SceneShape, ...]
    caption: str


def random_scene(rng: np.random.Generator, pair_p: float = 0.3) -> Scene:
    """A lone shape of some size at some place, or (with ``pair_p``) two shapes of different
    colours side by side or one above the other; the caption says which."""
    colours = list(SCENE_COLOURS)
    jitter = lambda: float(rng.uniform(-0.04, 0.04))  # noqa: E731
    if rng.random() >= pair_p:
        colour = colours[int(rng.integers(len(colours)))]
        kind = SCENE_SHAPES[int(rng.integers(len(SCENE_SHAPES)))]
        place = list(SCENE_PLACES)[int(rng.integers(len(SCENE_PLACES)))]
        large = rng.random() < 0.5
        radius = float(rng.uniform(0.22, 0.26) if large else rng.uniform(0.13, 0.16))
        x, y = SCENE_PLACES[place]
        shape = SceneShape(colour, kind, x + jitter(), y + jitter(), radius)
        size = "large" if large else "small"
        return Scene((shape,), f"a {size} {colour} {kind} {place} on a white background")
    first, second = (colours[int(i)] for i in rng.choice(len(colours), 2, replace=False))
    kinds = [SCENE_SHAPES[int(i)] for i in rng.integers(len(SCENE_SHAPES), size=2)]
    relation = list(SCENE_RELATIONS)[int(rng.integers(len(SCENE_RELATIONS)))]
    dx, dy = SCENE_RELATIONS[relation]
    radius = float(rng.uniform(0.15, 0.18))
    a = SceneShape(first, kinds[0], 0.5 + dx / 2 + jitter(), 0.5 + dy / 2 + jitter(), radius)
    b = SceneShape(second, kinds[1], 0.5 - dx / 2 + jitter(), 0.5 - dy / 2 + jitter(), radius)
    caption = f"a {first} {kinds[0]} {relation} a {second} {kinds[1]} on a white background"
    return Scene((a, b), caption)


def star_points(x: float, y: float, r: float, inner: float = 0.45) -> list[tuple[float, float]]:
    """A five-pointed star, one point up: outer radius ``r``, inner radius ``inner`` x ``r``."""
    points = []
    for i in range(10):
        radius = r if i % 2 == 0 else r * inner
        angle = math.pi * i / 5 - math.pi / 2
        points.append((x + radius * math.cos(angle), y + radius * math.sin(angle)))
    return points


def draw_scene(
    scene: Scene, side: int, supersample: int = 4, height: int | None = None
) -> Image.Image:
    """The scene as an RGB image ``side`` pixels square, or ``side`` wide and ``height`` high
    (x and y are fractions of the width and height, radii of the shorter side); drawn larger,
    then downsampled, for smooth edges."""
    height = side if height is None else height
    big_w, big_h = side * supersample, height * supersample
    big = min(big_w, big_h)
    image = Image.new("RGB", (big_w, big_h), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        x, y, r = shape.x * big_w, shape.y * big_h, shape.radius * big
        fill = SCENE_COLOURS[shape.colour]
        if shape.kind == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif shape.kind == "square":
            s = r * 0.89  # about the circle's area
            draw.rectangle((x - s, y - s, x + s, y + s), fill=fill)
        elif shape.kind == "star":
            draw.polygon(star_points(x, y, r), fill=fill)
        else:
            draw.polygon([(x, y - r), (x + r * 0.95, y + r * 0.8), (x - r * 0.95, y + r * 0.8)],
                         fill=fill)  # fmt: skip
    return image.resize((side, height), Image.LANCZOS)


@dataclass
class SceneSpec:
    """What a set of scene shards holds."""

    samples: int = 1000
    per_shard: int = 250
    side: int = 64
    """Image side in pixels (the filters' ``min_size`` should not exceed it)."""
    small_side: int = 24
    """Side of the too-small images the size filter must drop."""
    pair_p: float = 0.3
    """Share of two-shape scenes."""
    aspect_ratios: list[float] = dataclasses.field(default_factory=list)
    """Width / height of each image, drawn uniformly from this list (about ``side``^2 pixels,
    sides multiples of 8: 2.0 at side 64 is 88x48); empty (default): ``side`` square. For
    aspect-ratio buckets (``data.buckets``)."""
    reject_fraction: float = 0.16
    """Share of samples the default filters drop: low aesthetic score, high pwatermark, high
    punsafe or too small, in equal parts."""
    corrupt_fraction: float = 0.02
    """Share of samples with a truncated JPEG (counted as ``bad_image`` errors)."""
    seed: int = 0


REJECT_REASONS = ("aesthetic", "watermark", "unsafe", "size")


def scene_sample(rng: np.random.Generator, index: int, spec: SceneSpec) -> dict:
    """One img2dataset-style sample (``jpg``, ``txt``, ``json``) with LAION-style metadata.

    Samples meant for the filters look the part: low-aesthetic ones are muddy, watermarked ones
    carry a grey stripe pattern; unsafe ones are ordinary scenes with a high ``punsafe``.
    """
    scene = random_scene(rng, spec.pair_p)
    side = spec.side
    meta = {
        "caption": scene.caption,
        "url": f"https://example.invalid/scenes/{index:07d}.jpg",
        "key": "",
        "AESTHETIC_SCORE": round(float(rng.uniform(5.2, 7.0)), 3),
        "pwatermark": round(float(rng.uniform(0.0, 0.3)), 3),
        "punsafe": round(float(rng.uniform(0.0, 0.05)), 3),
        "similarity": round(float(rng.uniform(0.3, 0.4)), 3),
    }
    reason = None
    if rng.random() < spec.reject_fraction:
        reason = REJECT_REASONS[int(rng.integers(len(REJECT_REASONS)))]
    if reason == "size":
        side = spec.small_side
    width = height = side
    if spec.aspect_ratios:  # drawn only then: square sets keep their random stream
        ratio = spec.aspect_ratios[int(rng.integers(len(spec.aspect_ratios)))]
        if reason != "size":
            width = max(8, round(side * ratio**0.5 / 8) * 8)
            height = max(8, round(side / ratio**0.5 / 8) * 8)
    image = draw_scene(scene, width, height=height)
    if reason == "aesthetic":
        meta["AESTHETIC_SCORE"] = round(float(rng.uniform(2.5, 4.5)), 3)
        noise = rng.normal(0, 40, (height, width, 3))
        muddy = np.asarray(image, dtype=np.float64) * 0.6 + 50 + noise
        image = Image.fromarray(np.clip(muddy, 0, 255).astype(np.uint8))
    elif reason == "watermark":
        meta["pwatermark"] = round(float(rng.uniform(0.6, 0.95)), 3)
        draw = ImageDraw.Draw(image)
        for offset in range(-height, width, 8):
            draw.line((offset, height, offset + height, 0), fill=(128, 128, 128), width=2)
    elif reason == "unsafe":
        meta["punsafe"] = round(float(rng.uniform(0.3, 0.9)), 3)
    meta.update(width=width, height=height, original_width=width, original_height=height)
    data = jpeg_bytes(image, quality=95)
    if rng.random() < spec.corrupt_fraction:
        data = data[: len(data) // 3]
    meta["scene"] = [dataclasses.asdict(shape) for shape in scene.shapes]
    return {"jpg": data, "txt": scene.caption, "json": meta}


def write_scene_shards(
    out_dir: str | Path, spec: SceneSpec, progress: Callable[[int], None] | None = None
) -> list[Path]:
    """Write ``spec.samples`` scene samples as shards; ``progress(n)`` after every sample."""
    rng = np.random.default_rng(spec.seed)
    with ShardWriter(out_dir, per_shard=spec.per_shard) as writer:
        for i in range(spec.samples):
            sample = scene_sample(rng, i, spec)
            sample["json"]["key"] = writer.next_key()
            writer.write(sample)
            if progress is not None:
                progress(1)
    return writer.written
