"""Latent shards: what ``sdtrain data encode`` stores per sample and how the loader reads it back
(``data.latents: true``), so that training skips the frozen VAE encoder.

A latent sample keeps the input sample's key and its members other than the image and depth
(caption, json, ...) and adds:

- ``moments.npy``: the VAE posterior of the training crop, ``cat([mean, logvar])`` on channels,
  float16, (2C, h, w) (MosaicML's layout; logvar already clamped to [-30, 20]). The trainer
  samples ``mean + exp(logvar / 2) * noise`` with the step's own generator, then scales it.
- ``moments_flip.npy``: the same for the horizontally flipped crop (``--flip both``), which
  ``data.image.flip_p`` picks per sample.
- ``text.npy``: the caption's text-encoder output, float16 (T, D) (``--text``), read with
  ``data.text_embeddings: true``.
- ``crop.png``: the crop itself (RGB, lossless) where training still needs pixels (inpainting
  encodes the masked image per step: its mask is random per step).
- ``depth_crop.png``: the depth map cropped like the image, [-1, 1] as 16-bit (depth models).
- ``latent.json``: the record: the VAE's fingerprint (hash of its encoder weights and the latent
  scale), the text encoder's (with ``--text``), the crop size, whether flipped moments exist,
  original size and crop offsets. A shard made by another VAE, at another size or without what
  the config needs is refused, naming both sides; a missing or mis-shaped member is counted
  (``bad_latent``) and skipped like a bad image.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdtrain.data.buckets import BucketSet
from sdtrain.data.config import DataConfig
from sdtrain.data.shards import DataError

RECORD = "latent.json"
MOMENTS = "moments.npy"
MOMENTS_FLIP = "moments_flip.npy"
TEXT = "text.npy"
CROP = "crop.png"
DEPTH_CROP = "depth_crop.png"
LATENT_MEMBERS = (RECORD, MOMENTS, MOMENTS_FLIP, TEXT, CROP, DEPTH_CROP)
VERSION = 1


class LatentDecodeError(ValueError):
    """A latent member that is missing, undecodable or of the wrong shape (the sample is
    skipped and counted)."""


# ---------------------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------------------


def weights_fingerprint(state: Mapping[str, torch.Tensor], *extra: object) -> str:
    """16 hex digits of sha256 over names, dtypes, shapes and bytes (sorted by name) + ``extra``."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(repr(extra).encode())
    return digest.hexdigest()[:16]


def vae_fingerprint(autoencoder_state: Mapping[str, torch.Tensor], scale_factor: float) -> str:
    """What decides a latent: the encoder half (``encoder.*``, ``quant_conv.*``) and the latent
    scale; a fine-tuned decoder (sd-vae-ft-mse) keeps the fingerprint."""
    encoder = {k: v for k, v in autoencoder_state.items()
               if k.startswith(("encoder.", "quant_conv."))}  # fmt: skip
    return f"vae-{weights_fingerprint(encoder, float(scale_factor))}"


def text_fingerprint(text_state: Mapping[str, torch.Tensor]) -> str:
    return f"text-{weights_fingerprint(text_state)}"


# ---------------------------------------------------------------------------------------------
# The record
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatentRecord:
    """``latent.json`` of one sample."""

    vae: str
    """``vae_fingerprint`` of the encoder that made the moments."""
    scale_factor: float
    size: tuple[int, int]
    """(h, w) of the crop in pixels."""
    moments_shape: tuple[int, int, int]
    """(2C, h / f, w / f)."""
    flip: bool
    """``moments_flip.npy`` is present (``--flip both``)."""
    text: str = ""
    """``text_fingerprint`` of the text encoder of ``text.npy``; "" without one."""
    crop: bool = False
    depth: bool = False
    original_size: tuple[int, int] = (0, 0)
    crop_top_left: tuple[int, int] = (0, 0)
    version: int = VERSION

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes) -> LatentRecord:
        try:
            raw = json.loads(data)
            fields = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
            return cls(**fields)
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError, AttributeError) as err:
            raise LatentDecodeError(f"{RECORD} is not a latent record: {err}") from None


# ---------------------------------------------------------------------------------------------
# Members: writing (data encode) and reading (the loader)
# ---------------------------------------------------------------------------------------------


def array_bytes(array: torch.Tensor | np.ndarray) -> bytes:
    """float16 ``.npy`` bytes (no pickle)."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().to(torch.float16).numpy()
    out = io.BytesIO()
    np.save(out, np.ascontiguousarray(array, dtype=np.float16), allow_pickle=False)
    return out.getvalue()


def crop_png(image: torch.Tensor) -> bytes:
    """uint8 (3, H, W) -> lossless PNG bytes."""
    out = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(out, format="PNG")
    return out.getvalue()


def depth_crop_png(depth: torch.Tensor) -> bytes:
    """(1, H, W) in [-1, 1] -> 16-bit PNG bytes (steps of 2 / 65535)."""
    levels = ((depth[0].clamp(-1, 1) + 1) * 32767.5).round().to(torch.int32).numpy()
    out = io.BytesIO()
    Image.fromarray(levels.astype(np.uint16)).save(out, format="PNG")
    return out.getvalue()


def _npy(members: Mapping[str, bytes], name: str) -> np.ndarray:
    if name not in members:
        raise LatentDecodeError(f"no {name} member")
    try:
        return np.load(io.BytesIO(members[name]), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise LatentDecodeError(f"{name} is not a .npy array: {err}") from None


def _array(members: Mapping[str, bytes], name: str, shape: tuple[int, ...]) -> torch.Tensor:
    array = _npy(members, name)
    if array.shape != shape or array.dtype != np.float16:
        raise LatentDecodeError(f"{name} is {array.dtype} {array.shape}, expected float16 {shape}")
    if not np.isfinite(array).all():
        raise LatentDecodeError(f"{name} holds NaN or infinite values")
    return torch.from_numpy(array.copy())


def _png(members: Mapping[str, bytes], name: str, size: tuple[int, int]) -> np.ndarray:
    if name not in members:
        raise LatentDecodeError(f"no {name} member")
    try:
        with Image.open(io.BytesIO(members[name])) as image:
            image.load()
            array = np.asarray(image)
    except Exception as err:  # any failure is a property of the bytes (as transforms._decode)
        raise LatentDecodeError(f"cannot decode {name}: {type(err).__name__}: {err}") from None
    if array.shape[:2] != size:
        raise LatentDecodeError(f"{name} is {array.shape[:2]}, expected {size}")
    return array


def read_record(members: Mapping[str, bytes]) -> LatentRecord:
    if RECORD not in members:
        raise LatentDecodeError(f"no {RECORD} member (not written by sdtrain data encode?)")
    return LatentRecord.from_json(members[RECORD])


def check_record(record: LatentRecord, cfg: DataConfig, where: str) -> None:
    """What the config needs of a latent shard: a mismatch is a ``DataError`` (the run stops),
    not a skipped sample, since every sample of such a shard would be unusable."""
    want = (cfg.image.height, cfg.image.out_width)
    made = "made by `sdtrain data encode`"
    if cfg.buckets.enabled:  # encoded with buckets: each sample at its bucket's size
        buckets = BucketSet(cfg.buckets, *want).buckets
        if tuple(record.size) not in {(b.height, b.width) for b in buckets}:
            raise DataError(
                f"latent shard sample {where} was encoded at {record.size[0]}x{record.size[1]} "
                f"px (h x w), which is none of this run's data.buckets "
                f"({', '.join(b.name for b in buckets)}, w x h): encode the shards again with "
                "this bucket set, or train with theirs"
            )
    elif tuple(record.size) != want:
        raise DataError(
            f"latent shard sample {where} was encoded at {record.size[0]}x{record.size[1]} px "
            f"but this run's data.image is {want[0]}x{want[1]} px: encode the shards again at "
            "this size, or train at theirs"
        )
    if cfg.image.flip_p > 0 and not record.flip:
        raise DataError(
            f"latent shard sample {where} has no flipped moments ({made} with --flip none) "
            f"but data.image.flip_p={cfg.image.flip_p:g}: encode with --flip both, or set "
            "data.image.flip_p=0"
        )
    if cfg.text_embeddings and not record.text:
        raise DataError(
            f"latent shard sample {where} holds no caption embedding ({made} without --text) "
            "but data.text_embeddings=true: encode with --text, or set "
            "data.text_embeddings=false"
        )
    if cfg.masks.enabled and not record.crop:
        raise DataError(
            f"latent shard sample {where} holds no cropped image, which inpainting (data.masks)"
            " needs to encode the masked image per step: encode it with an inpainting config"
        )
    if cfg.depth.enabled and not record.depth:
        raise DataError(
            f"latent shard sample {where} holds no cropped depth map, which data.depth needs: "
            "encode it with a depth config (data.depth.enabled: true)"
        )


def latent_sample(
    members: Mapping[str, bytes], cfg: DataConfig, rng: np.random.Generator, where: str
) -> dict[str, Any]:
    """The model-ready part of a latent sample: ``moments`` float16 (2C, h, w), ``latent_vae``
    (its fingerprint), ``original_size``, ``crop_top_left``, and as configured ``image`` uint8
    (3, H, W), ``depth`` (1, H, W) in [-1, 1], ``text_embedding`` float16 (T, D) + ``latent_text``.

    The flip is drawn from ``rng`` first (only when ``data.image.flip_p > 0``), so the caller
    draws the mask after it. Raises ``LatentDecodeError`` for a bad member, ``DataError`` for a
    shard that does not fit the config (``check_record``)."""
    record = read_record(members)
    check_record(record, cfg, where)
    flipped = bool(cfg.image.flip_p > 0 and rng.random() < cfg.image.flip_p)
    shape = tuple(int(n) for n in record.moments_shape)
    if len(shape) != 3 or shape[0] % 2:
        raise LatentDecodeError(f"{RECORD} gives moments of shape {shape}, not (2C, h, w)")
    sample: dict[str, Any] = {
        "moments": _array(members, MOMENTS_FLIP if flipped else MOMENTS, shape),
        "latent_vae": record.vae,
        "original_size": torch.tensor(record.original_size),  # (h, w)
        "crop_top_left": torch.tensor(record.crop_top_left),  # (top, left), as CropInfo
    }
    size = (int(record.size[0]), int(record.size[1]))
    if cfg.buckets.enabled:  # latent batches group by the stored size
        sample["bucket_size"] = torch.tensor(size)  # (h, w)
    if record.crop:  # written only for modes that need pixels in training
        rgb = torch.from_numpy(_png(members, CROP, size).copy())
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise LatentDecodeError(f"{CROP} is not an RGB image")
        image = rgb.permute(2, 0, 1).contiguous()  # (3, H, W) uint8
        sample["image"] = image.flip(-1) if flipped else image
    if cfg.depth.enabled:
        levels = _png(members, DEPTH_CROP, size).astype(np.float32)
        depth = torch.from_numpy(levels / 32767.5 - 1.0)[None]  # (1, H, W) in [-1, 1]
        sample["depth"] = depth.flip(-1) if flipped else depth
    if cfg.text_embeddings:
        text = _npy(members, TEXT)
        if text.ndim != 2 or text.dtype != np.float16 or not np.isfinite(text).all():
            raise LatentDecodeError(f"{TEXT} is {text.dtype} {text.shape}, not float16 (T, D)")
        sample["text_embedding"] = torch.from_numpy(text.copy())
        sample["latent_text"] = record.text
    return sample
