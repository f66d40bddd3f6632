"""Aspect-ratio buckets (``data.buckets``): which output size a sample is cropped to, and the
per-bucket buffers that make every batch hold one size.

A bucket set is either generated (sides in steps of ``step`` pixels, area as close to the
configured image area as the step allows without exceeding it, width / height ratio within
``[min_ratio, max_ratio]``) or an explicit list of ``[width, height]``. A sample goes to the
bucket whose aspect ratio is nearest its own (distance of the log ratios, so 1:2 and 2:1 are
equally far from 1:1), is resized so that it covers the bucket and cropped
(:func:`sdtrain.data.transforms.plan_crop`); a sample that would need a larger upscale than
``max_upscale`` is dropped and counted (rejection reason ``upscale``).

The buffers hold prepared samples; each worker's stream owns one :class:`BucketBatcher` and
saves the identities of the samples it holds in its position, so a resumed stream re-reads and
re-prepares them (their crops are seeded per sample) and emits exactly the batches an
uninterrupted one would.

Generated set, closed form: for every short side ``t = step, 2 step, ...`` with ``t * t <= area``
the long side is ``floor(area / (t * step)) * step``; both orientations ``(long, t)`` and
``(t, long)`` whose ratio lies in range are kept. For 512 px and a 64 px step: 384x640,
448x576, 512x512, 576x448, 640x384.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, TypeVar

from sdtrain.errors import ConfigError
from sdtrain.utils.checks import require_finite, require_range

T = TypeVar("T")

UPSCALE_REASON = "upscale"
"""The rejection reason of a sample whose bucket needs more than ``max_upscale``."""


@dataclass
class BucketConfig:
    """Aspect-ratio buckets: every batch holds samples cropped to one (width, height)."""

    enabled: bool = False
    """Off: every sample is cropped to ``data.image`` (one size)."""
    step: int = 64
    """Side step of the generated buckets in pixels (a multiple of 8; 64 keeps every SD latent
    side a multiple of 8)."""
    min_ratio: float = 0.5
    """Smallest width / height of a generated bucket (0.5 = 1:2, portrait)."""
    max_ratio: float = 2.0
    """Largest width / height of a generated bucket (2.0 = 2:1, landscape)."""
    sizes: list[list[int]] = field(default_factory=list)
    """An explicit bucket list of ``[width, height]`` in pixels (each side a positive multiple
    of 8), used instead of the generated set when not empty."""
    max_upscale: float = 2.0
    """Largest factor a sample may be enlarged by to cover its bucket; samples that need more
    are dropped (counted as ``upscale``). 1.0 never upscales."""

    def __post_init__(self) -> None:
        require_finite(self)
        if self.step < 8 or self.step % 8:
            raise ConfigError(f"must be a positive multiple of 8, got {self.step}", key="step")
        require_range(self, "min_ratio", low=0.0, high=1.0, low_open=True, note="<= 1:1")
        require_range(self, "max_ratio", low=1.0, note=">= 1:1")
        require_range(self, "max_upscale", low=1.0)
        for index, entry in enumerate(self.sizes):
            if len(entry) != 2:
                raise ConfigError(f"entry {index} {entry!r} must be [width, height]", key="sizes")
            for name, side in zip(("width", "height"), entry, strict=True):
                if side <= 0 or side % 8:
                    raise ConfigError(
                        f"entry {index} {entry!r}: {name} {side} is not a positive multiple of "
                        "8 (the autoencoder's factor)",
                        key="sizes",
                    )


class Bucket(NamedTuple):
    """One output size in pixels."""

    width: int
    height: int

    @property
    def ratio(self) -> float:
        return self.width / self.height

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}"


def generate_buckets(
    area: int, step: int, min_ratio: float = 0.5, max_ratio: float = 2.0
) -> list[Bucket]:
    """The generated set (closed form in the module docstring), sorted by ratio."""
    found: set[Bucket] = set()
    short = step
    while short * short <= area:
        long = area // (short * step) * step
        for bucket in (Bucket(long, short), Bucket(short, long)):
            if min_ratio <= bucket.ratio <= max_ratio:
                found.add(bucket)
        short += step
    return sorted(found, key=lambda b: (b.ratio, -b.width * b.height))


class BucketSet:
    """The buckets of a config, and where a sample of a given size goes."""

    def __init__(self, cfg: BucketConfig, height: int, width: int) -> None:
        self.cfg = cfg
        if cfg.sizes:
            unique = {Bucket(int(w), int(h)) for w, h in cfg.sizes}
            self.buckets = sorted(unique, key=lambda b: (b.ratio, -b.width * b.height))
        else:
            self.buckets = generate_buckets(height * width, cfg.step, cfg.min_ratio, cfg.max_ratio)
        if not self.buckets:
            raise ConfigError(
                f"no bucket of area <= {height}x{width} px with sides in steps of {cfg.step} "
                f"has a width / height in [{cfg.min_ratio:g}, {cfg.max_ratio:g}]: use a smaller "
                "step or list data.buckets.sizes",
                key="buckets.step",
            )
        self._log_ratios = [math.log(b.ratio) for b in self.buckets]

    def nearest(self, width: int, height: int) -> Bucket:
        """The bucket nearest in log aspect ratio (the first of equals: the lower ratio)."""
        target = math.log(width / height)
        distances = [abs(target - r) for r in self._log_ratios]
        return self.buckets[distances.index(min(distances))]

    def place(self, width: int, height: int) -> Bucket | None:
        """The nearest bucket, or None when covering it needs more than ``max_upscale``."""
        bucket = self.nearest(width, height)
        return bucket if cover_scale(bucket, width, height) <= self.cfg.max_upscale else None


def require_multiple(cfg: BucketConfig, height: int, width: int, multiple: int, why: str) -> None:
    """Every bucket side divides by ``multiple`` (``why`` says what needs it: the UNet's
    downsampling); a ``ConfigError`` naming the buckets that do not, keyed ``buckets.sizes`` or
    ``buckets.step``."""
    bad = [b.name for b in BucketSet(cfg, height, width).buckets
           if b.width % multiple or b.height % multiple]  # fmt: skip
    if bad:
        key, fix = ("sizes", "list sides") if cfg.sizes else ("step", "use a step")
        raise ConfigError(
            f"bucket(s) {', '.join(bad)} (w x h) do not divide by {multiple} px, which {why} "
            f"needs: {fix} in multiples of {multiple}",
            key=f"buckets.{key}",
        )


def cover_scale(bucket: Bucket, width: int, height: int) -> float:
    """The factor that makes a ``width`` x ``height`` image just cover ``bucket``."""
    return max(bucket.width / width, bucket.height / height)


def fingerprint_part(cfg: BucketConfig, height: int, width: int) -> list[object]:
    """What of the bucket setup decides the batches (for the stream's fingerprint)."""
    return [[list(b) for b in BucketSet(cfg, height, width).buckets], cfg.max_upscale]


class BucketBatcher(Generic[T]):
    """Per-bucket buffers: ``add`` returns a full batch of one bucket once it has ``size``
    items; ``refs`` lists what is held (arrival order) for the stream's position."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._held: dict[Bucket, list[tuple[object, T]]] = {}
        self._order: list[tuple[object, Bucket]] = []

    def add(self, bucket: Bucket, ref: object, item: T) -> list[T] | None:
        held = self._held.setdefault(bucket, [])
        held.append((ref, item))
        self._order.append((ref, bucket))
        if len(held) < self.size:
            return None
        del self._held[bucket]
        self._order = [entry for entry in self._order if entry[1] != bucket]
        return [item for _, item in held]

    def refs(self) -> list[object]:
        """The identities of the held items, in the order they arrived."""
        return [ref for ref, _ in self._order]

    def drain(self) -> Iterator[list[T]]:
        """The partly filled buffers (end of a pass), in the order their first item arrived."""
        firsts = list(dict.fromkeys(bucket for _, bucket in self._order))
        for bucket in firsts:
            yield [item for _, item in self._held.pop(bucket)]
        self._order = []
