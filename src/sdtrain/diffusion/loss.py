"""Training-noise sampling and the per-sample loss weighting of the diffusion objective.

The loss is the original ``p_losses`` with ``l_simple_weight = 1`` and ``original_elbo_weight = 0``:
squared error averaged over C, H, W, then a weighted mean over the batch. Offset noise and
min-SNR-gamma weighting are opt-in (``DiffusionConfig``); with both off this is the original.
A masked loss (``data.loss_mask``) averages over the pixels its per-pixel weights keep instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdtrain.diffusion.schedule import NoiseSchedule


def sample_noise(
    like: torch.Tensor, offset_noise: float = 0.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Gaussian noise shaped like ``like``, plus ``offset_noise`` x a per-(sample, channel) value.

    The offset term lets the model shift an image's mean brightness, which plain noise hides.
    """
    noise = torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    if offset_noise > 0:
        offset = torch.randn(
            (*like.shape[:2], *([1] * (like.ndim - 2))),
            generator=generator,
            device=like.device,
            dtype=like.dtype,
        )
        noise = noise + offset_noise * offset
    return noise


def min_snr_weights(schedule: NoiseSchedule, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample weights (B,) that are ``min(SNR, gamma)`` in x0 space (Hang et al. 2023),
    read in the target space of the schedule's parameterisation: min(SNR, gamma) / SNR for eps,
    min(SNR, gamma) / (SNR + 1) for v.
    """
    snr = schedule.snr(t)
    return schedule.parameterization.loss_weights(snr.clamp(max=gamma), snr)


def latent_weights(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Per-pixel loss weights (B, 1, h, w) in [0, 1] at latent size from (B, 1, H, W) {0, 1}
    masks (1 = counts): the fraction of each latent pixel's image pixels that count."""
    return F.interpolate(mask.float(), size=size, mode="area")


def diffusion_loss(
    schedule: NoiseSchedule,
    prediction: torch.Tensor,
    target: torch.Tensor,
    t: torch.Tensor,
    pixel_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scalar loss: MSE over C, H, W per sample, weighted (min-SNR when configured), batch mean.

    ``pixel_weights`` (B, 1, h, w) make the per-sample MSE a weighted mean over the pixels (a
    masked loss: ``latent_weights``); a sample whose weights are all 0 contributes 0.
    """
    error = (prediction.float() - target.float()).pow(2)  # (B, C, h, w)
    dims = tuple(range(1, target.ndim))
    if pixel_weights is None:
        per_sample = error.mean(dim=dims)
    else:
        weights = pixel_weights.to(error.device, error.dtype)  # (B, 1, h, w)
        total = (weights.sum(dim=dims) * error.shape[1]).clamp(min=torch.finfo(error.dtype).tiny)
        per_sample = (error * weights).sum(dim=dims) / total
    gamma = schedule.config.min_snr_gamma
    if gamma > 0:
        per_sample = per_sample * min_snr_weights(schedule, t, gamma).to(per_sample.device)
    return per_sample.mean()
