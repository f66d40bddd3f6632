"""How an x4 upscaler's low-resolution training inputs are made from the high-resolution crops.

The original x4 upscaler (``x4-upscaling-ema.ckpt``) did not publish how its low-resolution
training inputs were made; its repository ships ``image_degradation`` code (blur, resize, noise,
JPEG) in the spirit of BSRGAN / Real-ESRGAN, but its configs do not say which steps were used.
sdtrain's default is the plainest choice: a bicubic, antialiased ``factor``x downscale of the
target crop. Blur, Gaussian noise and JPEG re-compression are opt-in, each drawn per sample from
the step's generator so that a resumed run makes exactly the same inputs.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from sdtrain.errors import ConfigError
from sdtrain.utils.checks import require_finite, require_range


@dataclass
class DegradationConfig:
    """The degradation from target crop to low-res input (``model.upscale.degradation``)."""

    blur_sigma: float = 0.0
    """Maximum Gaussian blur sigma (in high-res pixels) before downscaling, drawn uniformly in
    [0, blur_sigma] per sample; 0 = no blur."""
    noise_std: float = 0.0
    """Maximum std of Gaussian noise added to the low-res image (in [-1, 1] units), drawn uniformly
    in [0, noise_std] per sample; 0 = none (the conditioning's own noise augmentation remains)."""
    jpeg_quality: int = 0
    """Lowest JPEG quality (1-95) of a re-compression of the low-res image, drawn uniformly in
    [jpeg_quality, 95] per sample; 0 = no re-compression."""

    def __post_init__(self) -> None:
        require_finite(self)
        require_range(self, "blur_sigma", "noise_std", low=0)
        if self.jpeg_quality and not 1 <= self.jpeg_quality <= 95:
            raise ConfigError(
                f"must be in [1, 95] or 0 (off), got {self.jpeg_quality}", key="jpeg_quality"
            )


def gaussian_blur(images: Tensor, sigmas: Tensor) -> Tensor:
    """Per-sample separable Gaussian blur of (B, C, H, W) with ``sigmas`` (B,); 0 = unchanged."""
    out = []
    for image, sigma in zip(images, sigmas.tolist(), strict=True):
        if sigma <= 0:
            out.append(image)
            continue
        radius = max(1, int(3 * sigma + 0.5))
        x = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
        kernel = torch.exp(-(x**2) / (2 * sigma**2))
        kernel = kernel / kernel.sum()
        c = image.shape[0]
        h = F.conv2d(
            F.pad(image[None], (radius, radius, 0, 0), mode="reflect"),
            kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1),
            groups=c,
        )
        h = F.conv2d(
            F.pad(h, (0, 0, radius, radius), mode="reflect"),
            kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1),
            groups=c,
        )
        out.append(h[0])
    return torch.stack(out)


def jpeg_roundtrip(image: Tensor, quality: int) -> Tensor:
    """One (3, H, W) image in [-1, 1] through JPEG at ``quality`` and back."""
    pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=int(quality))
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    back = torch.from_numpy(decoded.copy()).permute(2, 0, 1).to(image.device, image.dtype)
    return back / 127.5 - 1


def downscale(images: Tensor, factor: int) -> Tensor:
    """Bicubic, antialiased ``factor``x downscale of (B, C, H, W) in [-1, 1], clamped."""
    h, w = images.shape[-2:]
    if h % factor or w % factor:
        raise ConfigError(
            f"a {h}x{w} image does not divide by the upscale factor {factor} "
            "(data.image.size must be a multiple of it)"
        )
    small = F.interpolate(
        images.float(), size=(h // factor, w // factor), mode="bicubic", antialias=True
    )
    return small.clamp(-1, 1).to(images.dtype)


def degrade(
    images: Tensor,
    factor: int,
    cfg: DegradationConfig | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Target crops (B, 3, H, W) in [-1, 1] -> low-res inputs (B, 3, H/f, W/f) in [-1, 1].

    Draws (in this order, only for the steps switched on): blur sigmas, noise stds and noise,
    JPEG qualities, all from ``generator`` on the images' device."""
    cfg = cfg or DegradationConfig()
    b, device = images.shape[0], images.device
    if cfg.blur_sigma > 0:
        sigmas = torch.rand(b, generator=generator, device=device) * cfg.blur_sigma
        images = gaussian_blur(images.float(), sigmas).to(images.dtype)
    low = downscale(images, factor)  # (B, 3, H/f, W/f)
    if cfg.noise_std > 0:
        stds = torch.rand(b, generator=generator, device=device) * cfg.noise_std
        noise = torch.randn(low.shape, generator=generator, device=device, dtype=low.dtype)
        low = (low + stds.view(b, 1, 1, 1).to(low.dtype) * noise).clamp(-1, 1)
    if cfg.jpeg_quality:
        qualities = torch.randint(cfg.jpeg_quality, 96, (b,), generator=generator, device=device)
        low = torch.stack(
            [jpeg_roundtrip(x, q) for x, q in zip(low, qualities.tolist(), strict=True)]
        )
    return low
