"""Typed configuration of the LAION WebDataset loader: shards, filters, images, masks, depth.

Default thresholds follow the Stable Diffusion recipes described in the seeds: 512 px, aesthetic
score >= 5.0 (SD 1.5 used > 5.0, SD 2 >= 4.5), pwatermark < 0.5, punsafe < 0.1, original size
>= 512. A sample without a score is kept by default, so that shards without LAION metadata (what
``sdtrain data make-shards`` writes from a plain folder) train as they are; the LAION recipes in
``configs/data/`` reject such samples explicitly (``missing: reject``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from sdtrain.data.buckets import BucketConfig, BucketSet
from sdtrain.errors import ConfigError
from sdtrain.utils.checks import require_finite, require_range

Comparison = Literal[">", ">=", "<", "<=", "=="]
MissingPolicy = Literal["keep", "reject"]


@dataclass
class ThresholdFilter:
    """Keep a sample when ``json[field] <comparison> value`` for the first field present."""

    enabled: bool = True
    """Off: the filter neither keeps nor rejects anything."""
    fields: list[str] = field(default_factory=list)
    """Candidate json field names, first present wins (e.g. ``AESTHETIC_SCORE``, ``aesthetic``)."""
    comparison: Comparison = ">="
    """How the field's value must compare with ``value`` for the sample to be kept."""
    value: float = 0.0
    """The threshold."""
    missing: MissingPolicy = "keep"
    """What happens when none of ``fields`` is present (or the value is null / not a number):
    ``keep`` (default: shards without LAION scores pass) or ``reject`` (the LAION recipes)."""

    def __post_init__(self) -> None:
        require_finite(self)
        if self.enabled and not self.fields:
            raise ConfigError("an enabled filter needs at least one field name", key="fields")


def _aesthetic() -> ThresholdFilter:
    return ThresholdFilter(fields=["AESTHETIC_SCORE", "aesthetic"], comparison=">=", value=5.0)


def _watermark() -> ThresholdFilter:
    return ThresholdFilter(fields=["pwatermark"], comparison="<", value=0.5)


def _unsafe() -> ThresholdFilter:
    return ThresholdFilter(fields=["punsafe"], comparison="<", value=0.1)


@dataclass
class FilterConfig:
    """Metadata filters, applied to the ``.json`` member before any image is decoded."""

    aesthetic: ThresholdFilter = field(default_factory=_aesthetic)
    """LAION aesthetic score (SD 1.5: > 5.0; SD 2: >= 4.5)."""
    watermark: ThresholdFilter = field(default_factory=_watermark)
    """LAION watermark probability (< 0.5)."""
    unsafe: ThresholdFilter = field(default_factory=_unsafe)
    """LAION NSFW probability (SD 2: punsafe < 0.1)."""
    min_size: int = 512
    """Minimum original width and height (``original_width`` / ``original_height``, falling back
    to ``width`` / ``height``); 0 disables."""
    size_missing: MissingPolicy = "reject"
    """When neither original nor plain sizes are present."""
    require_caption: bool = True
    """Reject samples whose caption is missing or blank after whitespace normalisation."""
    blocklist: list[str] = field(default_factory=list)
    """Reject captions containing any of these words (case-insensitive, whole words)."""

    def __post_init__(self) -> None:
        if self.min_size < 0:
            raise ConfigError("must be >= 0 (0 disables)", key="min_size")


@dataclass
class ImageConfig:
    """Decode, resize and crop."""

    size: int = 512
    """Output height when ``width`` is 0 (square), e.g. 256 / 512 / 768."""
    width: int = 0
    """Output width for non-square crops; 0 = same as ``size``."""
    crop: Literal["random", "center"] = "random"
    """Random crops for training, centre crops for validation."""
    flip_p: float = 0.0
    """Probability of a horizontal flip (SD trained without flips: 0)."""

    @property
    def height(self) -> int:
        return self.size

    @property
    def out_width(self) -> int:
        return self.width or self.size

    def __post_init__(self) -> None:
        require_finite(self)
        for key in ("size", "width"):
            value = getattr(self, key)
            if value < 0 or value % 8 or (key == "size" and value == 0):
                raise ConfigError(
                    f"must be a positive multiple of 8 (the autoencoder's factor), got {value}",
                    key=key,
                )
        if not 0 <= self.flip_p <= 1:
            raise ConfigError("must be a probability in [0, 1]", key="flip_p")


@dataclass
class MaskConfig:
    """Inpainting masks: 1 where the model repaints ("white for inpainting")."""

    enabled: bool = False
    """Produce ``mask`` for every sample (inpainting models)."""
    kind: Literal["sd15", "lama"] = "sd15"
    """``sd15``: the SD-1.5-inpainting synthetic recipe (strokes or boxes, 50/50); ``lama``:
    LaMa's mixed generator (irregular strokes, boxes, outpainting)."""
    preset: Literal["256train", "512train", "512train-large"] = "512train-large"
    """SD-1.5 recipe preset: stroke lengths / widths and box sizes."""
    full_mask_p: float = 0.25
    """Probability that the whole image is masked."""
    lama_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 0.0])
    """LaMa only: relative odds of the irregular, box and outpainting kinds (one per sample)."""

    def __post_init__(self) -> None:
        require_finite(self)
        if not 0 <= self.full_mask_p <= 1:
            raise ConfigError("must be a probability in [0, 1]", key="full_mask_p")
        weights = self.lama_weights
        if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
            raise ConfigError(
                "needs three non-negative odds (irregular, box, outpainting), not all 0",
                key="lama_weights",
            )


@dataclass
class DepthConfig:
    """Depth maps for depth-conditioned models (``depth.png`` 16-bit or ``.npy``)."""

    enabled: bool = False
    """Load, crop and normalise the depth member to [-1, 1]."""
    keys: list[str] = field(default_factory=lambda: ["depth.png", "depth.npy"])
    """Member suffixes tried in order."""
    missing: MissingPolicy = "reject"
    """A sample without a depth member is kept (with a zero map) or rejected."""


@dataclass
class DataConfig:
    """The training data: where the shards are and how samples are chosen and prepared."""

    shards: list[str] = field(default_factory=list)
    """Brace patterns (``/data/laion/{00000..23999}.tar``), paths, directories of ``.tar`` files,
    ``@file`` lists of URLs, or ``pipe:`` commands."""
    source: Literal["shards", "folder"] = "shards"
    """``shards``: WebDataset tar shards (``shards``, LAION scale); ``folder``: the images under
    ``folder`` read directly, with same-named sidecars (``data/folder.py``)."""
    folder: str = ""
    """With ``source: folder``: the folder of images (searched recursively; suffixes from
    ``image_keys``) with ``<name>.txt`` captions and optional ``<name>.json`` metadata,
    ``<name>.mask.png`` inpainting masks and ``<name>.depth.png`` / ``.depth.npy`` depth maps."""
    resampled: bool = True
    """Infinite mode: every epoch reshuffles the shards and starts over; False = one pass."""
    repeats: int = 1
    """Each shard (each image, with ``source: folder``) is read this many times per epoch, every
    time with its own crop, flip, mask and augmentation draws (small DreamBooth-style sets)."""
    shuffle_shards: bool = True
    """Shuffle the shard order (per epoch, seeded)."""
    shuffle_buffer: int = 1000
    """Samples held for shuffling within a worker; 0 or 1 = no shuffling."""
    batch_size: int = 4
    """Samples per batch per device."""
    num_workers: int = 4
    """DataLoader worker processes per rank."""
    caption_key: str = "txt"
    """Member holding the caption (falls back to the json ``caption``)."""
    image_keys: list[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"])
    """Members tried in order for the image."""
    filters: FilterConfig = field(default_factory=FilterConfig)
    """Metadata filters (before decode)."""
    image: ImageConfig = field(default_factory=ImageConfig)
    """Decode / resize / crop."""
    masks: MaskConfig = field(default_factory=MaskConfig)
    """Inpainting masks."""
    depth: DepthConfig = field(default_factory=DepthConfig)
    """Depth maps."""
    loss_mask: bool = False
    """A masked loss: each sample's mask file (a folder's ``<name>.mask.png``, a shard's
    ``mask.png`` member; white = counts) becomes ``loss_mask`` and the diffusion loss averages
    over those pixels only (at latent size); a sample without one counts everywhere. Independent
    of ``masks`` (the inpainting model's input), which may read the same file."""
    augment: list[dict[str, Any]] = field(default_factory=list)
    """Albumentations transforms applied at the output size to the image, its mask and depth map
    (``data/augment.py``), each ``{name: <transform class>, <parameter>: <value>, ...}``, e.g.
    ``[{name: ColorJitter, brightness: 0.1, p: 1.0}, {name: Affine, scale: [0.95, 1.05]}]``;
    drawn from the sample's own seed. Empty (default): no augmentation."""
    buckets: BucketConfig = field(default_factory=BucketConfig)
    """Aspect-ratio buckets (``data/buckets.py``): off by default (one output size)."""
    latents: bool = False
    """Read latent shards written by ``sdtrain data encode`` (``data/latents.py``): the stored VAE
    posterior replaces the image, so training skips the VAE encoder; the crops are the ones the
    encode run made. A shard from another VAE or at another size is refused."""
    text_embeddings: bool = False
    """With ``latents``: the caption embeddings of ``data encode --text`` replace the text
    encoder (caption dropout uses the empty prompt's embedding, computed once)."""
    max_error_rate: float = 0.05
    """Stop the run when more than this fraction of the samples seen are unreadable ..."""
    error_rate_min_samples: int = 1000
    """... once at least this many samples have been seen."""
    on_changed_shards: Literal["error", "skip"] = "error"
    """On resume, when samples of the saved shuffle buffer are gone from their shards (a shard
    truncated or rewritten since the checkpoint): stop with an error naming the shards, or drop
    those samples from the restored buffer, log how many, and carry on."""
    seed: int = 0
    """Seed of shard order, shuffling, crops, flips and masks."""

    def __post_init__(self) -> None:
        require_finite(self)
        if self.batch_size < 1:
            raise ConfigError("must be >= 1", key="batch_size")
        if self.num_workers < 0:
            raise ConfigError("must be >= 0", key="num_workers")
        if self.shuffle_buffer < 0:
            raise ConfigError("must be >= 0", key="shuffle_buffer")
        if not 0 <= self.max_error_rate <= 1:
            raise ConfigError("must be a fraction in [0, 1]", key="max_error_rate")
        require_range(self, "error_rate_min_samples", low=0)
        if self.text_embeddings and not self.latents:
            raise ConfigError("needs data.latents: true (latent shards)", key="text_embeddings")
        require_range(self, "seed", low=0, high=2**32 - 1)
        require_range(self, "repeats", low=1)
        if self.latents and self.source == "folder":
            raise ConfigError(
                "latent shards are shards: make shards of the folder (sdtrain data make-shards), "
                "encode them (sdtrain data encode) and train on those",
                key="source",
            )
        if self.latents and self.loss_mask:
            raise ConfigError(
                "loss masks are read with the images; latent shards hold no mask files",
                key="loss_mask",
            )
        if self.latents and self.augment:
            raise ConfigError(
                "augmentations run on decoded images; latent shards hold encoded crops",
                key="augment",
            )
        if self.augment:  # names and parameters checked now, not in the first batch
            from sdtrain.data.augment import build_augment

            build_augment(self.augment, self.image.height, self.image.out_width)
        if self.buckets.enabled:  # an empty generated set is a config error
            BucketSet(self.buckets, self.image.height, self.image.out_width)
