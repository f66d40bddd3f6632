"""Training-noise sampling and the per-sample loss weighting of the diffusion objective.

The loss is the original ``p_losses`` with ``l_simple_weight = 1`` and ``original_elbo_weight = 0``:
squared error averaged over C, H, W, then a weighted mean over the batch. Offset noise and
min-SNR-gamma weighting are opt-in (``DiffusionConfig``); with both off this is the original.
"""

from __future__ import annotations

import torch

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


def diffusion_loss(
    schedule: NoiseSchedule, prediction: torch.Tensor, target: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """Scalar loss: MSE over C, H, W per sample, weighted (min-SNR when configured), batch mean."""
    per_sample = (prediction.float() - target.float()).pow(2).mean(dim=tuple(range(1, target.ndim)))
    gamma = schedule.config.min_snr_gamma
    if gamma > 0:
        per_sample = per_sample * min_snr_weights(schedule, t, gamma).to(per_sample.device)
    return per_sample.mean()
