"""Per-sample image, depth and caption transforms of the loader: bytes in, uint8 tensors out.

The image path follows the measured recipe in ``shared/PERF_NOTES.md``:

1. Decode JPEGs at a reduced size with the codec's own DCT scaling (``Image.draft``), picking the
   largest power-of-two factor (1/2, 1/4, 1/8) whose decoded short side still covers the output;
   going below that costs 1.2-7 dB PSNR, so we never do.
2. Plan the crop in the coordinates of the original (upright) image, cut that window out of the
   decoded image and resize only the window to exactly (out_h, out_w) with
   ``torch.nn.functional.interpolate(uint8, "bicubic", antialias=True)`` (~5x faster than Pillow,
   same quality). EXIF orientation and the horizontal flip are transposes / flips of the small
   output (resizing commutes with them), so neither costs a pass over the decoded image.
3. Keep uint8 across the worker boundary; :func:`to_model_images` and :func:`masked_images` build
   the float [-1, 1] tensors on the device.

Albumentations is deliberately not used for the geometry: its transforms draw from their own random
state rather than the per-sample ``rng`` we must be deterministic in, and they crop / resize the
full decoded image, whereas planning in source coordinates is what lets us decode at reduced size
and resize only the window. The flip it would provide costs ~0.02 ms on the output tensor here.

Depth maps (``depth.png`` 16-bit or ``.npy``) are assumed to be in the upright frame of the image,
at any resolution; :func:`load_depth` crops them with the image's :class:`CropInfo` and normalises
them per sample to [-1, 1] as the original depth model does.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, JpegImagePlugin

from sdtrain.data.config import ImageConfig

ResizeMode = Literal["bicubic", "bilinear", "nearest"]

_ORIENTATION_TAG = 0x0112
_REDUCTIONS = (8, 4, 2)  # the scales libjpeg decodes natively (power-of-two DCT scaling)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_DEPTH_MODES = ("L", "F", *_SIXTEEN_BIT_MODES)


class ImageDecodeError(ValueError):
    """Image or depth bytes that cannot be decoded completely (corrupt, truncated, empty)."""


@dataclass(frozen=True)
class CropInfo:
    """Where a training crop came from: SDXL micro-conditioning plus the window for depth maps."""

    original_size: tuple[int, int]
    """(h, w) of the source image, upright (after EXIF orientation)."""
    crop_top_left: tuple[int, int]
    """(top, left) of the crop in the resized image (the image scaled so its shorter side covers
    the output), as SDXL's ``crop_coords_top_left`` defines it; not mirrored when ``flipped``."""
    flipped: bool
    """Whether the crop was flipped horizontally (after cropping)."""
    window: tuple[float, float, float, float]
    """(top, left, height, width) of the crop in ``original_size`` pixel coordinates; apply it to
    any array of the same scene with :func:`apply_geometry`."""


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


def needed_short_side(src_w: int, src_h: int, out_h: int, out_w: int) -> int:
    """Short side of the source once resized (aspect kept) to cover an (out_h, out_w) crop."""
    short = min(src_w, src_h)
    if out_h * src_w >= out_w * src_h:  # height is the binding side: scale = out_h / src_h
        return -(-short * out_h // src_h)
    return -(-short * out_w // src_w)


def reduction_factor(src_w: int, src_h: int, need_short: int) -> int:
    """Largest JPEG DCT reduction (8, 4, 2, else 1) whose decoded short side is >= need_short.

    libjpeg's scaled decode yields ``ceil(side / factor)`` pixels per side.
    """
    short = min(src_w, src_h)
    for factor in _REDUCTIONS:
        if -(-short // factor) >= need_short:
            return factor
    return 1


class _Orientation(NamedTuple):
    """Stored -> upright as: transpose (swap axes) first, then flip rows, then flip columns."""

    swap: bool
    flip_y: bool
    flip_x: bool


_ORIENTATIONS = {  # EXIF orientation tag -> what makes the stored pixels upright
    1: _Orientation(False, False, False),
    2: _Orientation(False, False, True),
    3: _Orientation(False, True, True),
    4: _Orientation(False, True, False),
    5: _Orientation(True, False, False),
    6: _Orientation(True, False, True),  # 90 degrees clockwise
    7: _Orientation(True, True, True),
    8: _Orientation(True, True, False),  # 90 degrees counter-clockwise
}
_TRANSPOSES = {  # the same, as the Pillow transpose ImageOps.exif_transpose uses
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class _Decoded(NamedTuple):
    array: np.ndarray  # (h, w, 3) uint8 as stored (not yet upright), possibly read-only
    original_size: tuple[int, int]  # (w, h) upright, before any reduction
    factor: int  # one decoded pixel = factor x factor original pixels
    orientation: int  # EXIF orientation still to apply to ``array`` (1 = upright)


def _orientation(image: Image.Image) -> int:
    value = image.getexif().get(_ORIENTATION_TAG, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """Composite straight-alpha RGBA uint8 onto white, rounded: rgb * a + 255 * (1 - a)."""
    alpha = rgba[..., 3:].astype(np.uint16)
    # 255 * 255 - a * (255 - rgb) never leaves uint16, unlike rgb * a + 255 * (255 - a).
    darken = (255 - rgba[..., :3]).astype(np.uint16) * alpha
    return ((65025 + 127 - darken) // 255).astype(np.uint8)


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any Pillow mode as (h, w, 3) uint8 RGB; transparency is composited onto white."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return np.asarray(image)
    if mode in _SIXTEEN_BIT_MODES:
        # Pillow's own I -> L conversion clips at 255 instead of scaling 16-bit data down.
        wide = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        gray = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode in _ALPHA_MODES or "transparency" in image.info:
        return _over_white(np.asarray(image.convert("RGBA")))
    # L, 1, P, CMYK (Pillow undoes Adobe inversion; libjpeg turns YCCK into CMYK), YCbCr, F, ...
    return np.asarray(image.convert("RGB"))


def _decode(data: bytes, out_h: int, out_w: int, upright: bool) -> _Decoded:
    """Decode (JPEGs at reduced size); ``upright`` applies the EXIF orientation to the pixels,
    otherwise it is returned for the caller to apply to its (smaller) output."""
    if not data:
        raise ImageDecodeError("empty image data (0 bytes)")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise ImageDecodeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set: refusing to decode")
    # Pillow signals malformed input with many exception types (OSError, SyntaxError, ValueError,
    # EOFError, struct.error, zlib.error, DecompressionBombError, IndexError in odd plugins...);
    # every failure in this block is a property of the bytes, so all become ImageDecodeError.
    try:
        image = Image.open(io.BytesIO(data))
        factor = 1
        if isinstance(image, JpegImagePlugin.JpegImageFile):  # JPEG and MPO (camera) files
            orientation = _orientation(image)  # APP1 is parsed at open: no pixels needed yet
            w, h = image.size
            up_w, up_h = (h, w) if _ORIENTATIONS[orientation].swap else (w, h)
            # The rule runs in the upright frame: that is where the output's (h, w) live.
            factor = reduction_factor(w, h, needed_short_side(up_w, up_h, out_h, out_w))
            if factor > 1:
                drafted = image.draft("RGB", (w // factor, h // factor))
                # draft() reports the scale it configured as a box of w / scale x h / scale
                factor = 1 if drafted is None else round(w / drafted[1][2])
            image.load()
        else:
            image.load()
            orientation = _orientation(image)  # PNG may carry eXIf after the pixel data
            w, h = image.size
            up_w, up_h = (h, w) if _ORIENTATIONS[orientation].swap else (w, h)
        if upright and orientation != 1:
            image = image.transpose(_TRANSPOSES[orientation])
            orientation = 1
        array = _to_rgb_array(image)
    except Exception as exc:
        raise ImageDecodeError(f"cannot decode image: {type(exc).__name__}: {exc}") from exc
    return _Decoded(array, (up_w, up_h), factor, orientation)


def decode_image(data: bytes, out_h: int, out_w: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode to upright RGB uint8 (H, W, 3), JPEGs at the largest reduction that still covers an
    (out_h, out_w) crop; returns the array and the ORIGINAL upright (width, height).

    Raises :class:`ImageDecodeError` on corrupt, truncated or empty data.
    """
    decoded = _decode(data, out_h, out_w, upright=True)
    array = decoded.array
    return (array if array.flags.writeable else array.copy()), decoded.original_size


def image_size(data: bytes) -> tuple[int, int]:
    """The upright (width, height) of encoded image bytes from their header (no pixel decode:
    the size a bucket is chosen by when the json has none); ``ImageDecodeError`` otherwise."""
    if not data:
        raise ImageDecodeError("empty image data (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
        w, h = image.size
        # A JPEG's EXIF is parsed at open; a PNG's eXIf chunk may follow the pixels (not seen).
        swap = _ORIENTATIONS[_orientation(image)].swap
    except Exception as exc:  # as in _decode: a property of the bytes
        raise ImageDecodeError(f"cannot read image size: {type(exc).__name__}: {exc}") from exc
    return (h, w) if swap else (w, h)


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------


def plan_crop(
    original_h: int,
    original_w: int,
    out_h: int,
    out_w: int,
    crop: Literal["random", "center"],
    flip_p: float,
    rng: np.random.Generator,
) -> CropInfo:
    """Resize-to-cover then crop, planned without touching pixels.

    Draws from ``rng`` in a fixed order: top, left (random crops only), then the flip (only when
    ``flip_p > 0``).
    """
    if out_h * original_w >= out_w * original_h:  # height binds: resized height == out_h
        resized_h = out_h
        resized_w = max(out_w, (2 * original_w * out_h + original_h) // (2 * original_h))
    else:
        resized_w = out_w
        resized_h = max(out_h, (2 * original_h * out_w + original_w) // (2 * original_w))
    if crop == "random":
        top = int(rng.integers(0, resized_h - out_h + 1))
        left = int(rng.integers(0, resized_w - out_w + 1))
    else:
        top, left = (resized_h - out_h) // 2, (resized_w - out_w) // 2
    flipped = bool(flip_p > 0 and rng.random() < flip_p)
    sy, sx = original_h / resized_h, original_w / resized_w
    return CropInfo(
        original_size=(original_h, original_w),
        crop_top_left=(top, left),
        flipped=flipped,
        window=(top * sy, left * sx, out_h * sy, out_w * sx),
    )


def _pixel_span(start: float, length: float, scale: float, limit: int) -> tuple[int, int]:
    lo = min(max(math.floor(start * scale + 0.5), 0), limit - 1)
    hi = min(max(math.floor((start + length) * scale + 0.5), lo + 1), limit)
    return lo, hi


def _crop_resize(
    array: np.ndarray,
    info: CropInfo,
    scale_y: float,
    scale_x: float,
    out_h: int,
    out_w: int,
    mode: ResizeMode,
    orientation: _Orientation = _ORIENTATIONS[1],
) -> torch.Tensor:
    """Cut ``info.window`` out of an (h, w, c) array, resize it to (out_h, out_w) and flip it;
    returns a contiguous (c, out_h, out_w) tensor.

    ``array`` holds the scene as stored: ``orientation`` turns it upright (where ``info`` lives),
    and array pixel = original pixel * scale along the array's own axes. Orientation is applied
    to the small output rather than the decoded image: resizing commutes with transposes and
    flips, and rotating a 512 px output costs ~0.1 ms against ~1.5 ms for a 1200x900 decode
    (``ImageOps.exif_transpose``).
    """
    top, left, height, width = info.window
    up_h, up_w = info.original_size
    if orientation.flip_x:  # undo the upright frame's flips, then its transpose
        left = up_w - left - width
    if orientation.flip_y:
        top = up_h - top - height
    size = (out_h, out_w)
    if orientation.swap:
        top, left, height, width = left, top, width, height
        size = (out_w, out_h)
    y0, y1 = _pixel_span(top, height, scale_y, array.shape[0])
    x0, x1 = _pixel_span(left, width, scale_x, array.shape[1])
    # Always copy the window: a strided view slows torch's uint8 resize by ~50%, the copy is a
    # cheap row memcpy, and the result never aliases (read-only) decoder memory.
    window_hwc = np.array(array[y0:y1, x0:x1], order="C")
    chw = torch.from_numpy(window_hwc).permute(2, 0, 1)  # (c, h, w) with channels-last strides
    if chw.shape[1:] != size:
        antialias = mode != "nearest"
        chw = F.interpolate(chw[None], size=size, mode=mode, antialias=antialias)[0]
    chw = chw.contiguous()  # (c, h, w): a no-op after interpolate, which returns planar output
    if orientation.swap:
        # cv2.transpose, plane by plane, takes 0.06 ms at 512 px; torch's uint8 transpose-copy
        # takes 0.6 ms and a Pillow round trip 1.3 ms.
        planes = chw.numpy()
        turned = np.empty((planes.shape[0], out_h, out_w), planes.dtype)
        for plane, target in zip(planes, turned, strict=True):
            cv2.transpose(plane, dst=target)
        chw = torch.from_numpy(turned)
    # Flip the small, contiguous output (0.02 ms): a negative-stride numpy copy of the decoded
    # image costs ~3 ms at 1200x900.
    dims = [1] * orientation.flip_y + [2] * (orientation.flip_x != info.flipped)
    return chw.flip(dims) if dims else chw


def apply_geometry(
    array: np.ndarray, info: CropInfo, out_h: int, out_w: int, mode: ResizeMode = "bicubic"
) -> np.ndarray:
    """Apply an image's crop / resize / flip to another array of the same upright scene.

    ``array`` is (H, W) or (H, W, C) at any resolution (each axis is scaled from
    ``info.original_size``); uint8 or float32 (bicubic on floats may overshoot the input range).
    Returns the same layout at (out_h, out_w).
    """
    planar = array.ndim == 2
    hwc = array[..., None] if planar else array
    scale_y = hwc.shape[0] / info.original_size[0]
    scale_x = hwc.shape[1] / info.original_size[1]
    out = _crop_resize(hwc, info, scale_y, scale_x, out_h, out_w, mode).permute(1, 2, 0).numpy()
    return np.ascontiguousarray(out[..., 0] if planar else out)


def load_image(
    data: bytes,
    cfg: ImageConfig,
    rng: np.random.Generator,
    size: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, CropInfo]:
    """Encoded image -> contiguous uint8 (3, out_h, out_w) tensor and its crop; ``size`` is
    (out_h, out_w) (an aspect-ratio bucket), default (cfg.height, cfg.out_width)."""
    out_h, out_w = size if size is not None else (cfg.height, cfg.out_width)
    decoded = _decode(data, out_h, out_w, upright=False)
    src_w, src_h = decoded.original_size
    info = plan_crop(src_h, src_w, out_h, out_w, cfg.crop, cfg.flip_p, rng)
    scale = 1.0 / decoded.factor  # libjpeg's scaled decode: exactly 1/factor per axis
    orientation = _ORIENTATIONS[decoded.orientation]
    image = _crop_resize(decoded.array, info, scale, scale, out_h, out_w, "bicubic", orientation)
    return image, info


# ---------------------------------------------------------------------------------------------
# Depth
# ---------------------------------------------------------------------------------------------


def _read_depth(data: bytes, suffix: str) -> np.ndarray:
    if not data:
        raise ImageDecodeError("empty depth data (0 bytes)")
    name = suffix.lower()
    try:
        if name.endswith("npy"):
            depth = np.load(io.BytesIO(data), allow_pickle=False)
        elif name.endswith("png"):
            image = Image.open(io.BytesIO(data))
            image.load()
            if image.mode not in _DEPTH_MODES:
                raise ImageDecodeError(f"depth PNG must be single-channel, got mode {image.mode}")
            depth = np.asarray(image)
        else:
            raise ImageDecodeError(f"unknown depth member {suffix!r} (expected .png or .npy)")
    except ImageDecodeError:
        raise
    except Exception as exc:  # same reasoning as in _decode: a property of the bytes
        raise ImageDecodeError(f"cannot decode depth: {type(exc).__name__}: {exc}") from exc
    if depth.ndim == 3 and depth.shape[0] == 1:
        depth = depth[0]
    elif depth.ndim == 3 and depth.shape[2] == 1:
        depth = depth[..., 0]
    if depth.ndim != 2 or depth.size == 0:
        raise ImageDecodeError(f"depth must be a non-empty (H, W) map, got shape {depth.shape}")
    if not (np.issubdtype(depth.dtype, np.integer) or np.issubdtype(depth.dtype, np.floating)):
        raise ImageDecodeError(f"depth must be numeric, got dtype {depth.dtype}")
    depth = depth.astype(np.float32)
    if not np.isfinite(depth).all():
        raise ImageDecodeError("depth contains NaN or infinite values")
    return depth


def read_depth_map(data: bytes, suffix: str) -> np.ndarray:
    """A depth file's bytes (``.png`` 8/16-bit single channel, ``.npy``) -> (H, W) float32;
    ``ImageDecodeError`` for bytes that are not one."""
    return _read_depth(data, suffix)


def load_depth(
    data: bytes,
    suffix: str,
    info: CropInfo,
    out_h: int,
    out_w: int,
    mode: ResizeMode = "bicubic",
) -> torch.Tensor:
    """Depth member -> float32 tensor (1, out_h, out_w) in [-1, 1], cropped like the image.

    ``suffix`` is the member name (``depth.png``: 8/16-bit single channel; ``depth.npy``: (H, W),
    (1, H, W) or (H, W, 1), loaded without pickle). Normalised per sample after resizing, as the
    original does: ``2 * (d - min) / (max - min + 0.001) - 1``.
    """
    depth = apply_geometry(_read_depth(data, suffix), info, out_h, out_w, mode)
    low, high = float(depth.min()), float(depth.max())
    normalised = 2.0 * (depth - low) / (high - low + 0.001) - 1.0
    return torch.from_numpy(normalised.astype(np.float32, copy=False))[None]


# ---------------------------------------------------------------------------------------------
# Captions and device-side tensors
# ---------------------------------------------------------------------------------------------


def normalize_caption(text: str | bytes) -> str:
    """Collapse every run of whitespace (newlines, tabs, no-break spaces...) to one space and
    strip; bytes are decoded as UTF-8 with U+FFFD for invalid sequences."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return " ".join(text.split())


def to_model_images(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 images (any shape) -> float32 in [-1, 1] (x / 127.5 - 1); call on the device."""
    return images_uint8.to(torch.float32) / 127.5 - 1.0


def masked_images(images: torch.Tensor, masks_uint8: torch.Tensor) -> torch.Tensor:
    """Inpainting input ``images * (1 - mask)``: (B, C, H, W) floats, (B, 1, H, W) {0, 1} masks
    (1 = repaint)."""
    return images * (1 - masks_uint8.to(images.dtype))
