"""Synthetic LAION-style shards for tests, benchmarks and the demo: photo-like JPEGs with
img2dataset metadata, plus samples the filters must drop and samples that are broken on purpose.
"""

from __future__ import annotations

import io
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
