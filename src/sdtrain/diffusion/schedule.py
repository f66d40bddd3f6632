"""The DDPM noise schedule exactly as the original ``register_schedule``, plus opt-in variants.

The betas and every derived quantity are computed in float64 (as the original does in numpy) and
stored as float32, which is what the original registers as buffers and saves in checkpoints.
``q_sample`` and the eps / v / x0 conversions gather these float32 values per sample; which of
them a model output needs is the configured ``Parameterization``'s business (``parameterization``).
Zero-terminal-SNR rescaling (Lin et al. 2023) is an opt-in variant of the betas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from sdtrain.diffusion.parameterization import (
    Parameterization,
    ParameterizationName,
    get_parameterization,
)
from sdtrain.errors import ConfigError
from sdtrain.utils.checks import require_finite, require_range

# The persistent buffers of the original DDPM, in registration order (unprefixed checkpoint keys).
SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


@dataclass
class DiffusionConfig:
    """Noise schedule, training objective and their opt-in variants."""

    parameterization: ParameterizationName = "eps"
    """What the UNet predicts: the noise (SD1, SD2-base) or v (SD2 768-v)."""
    schedule: Literal["linear", "cosine"] = "linear"
    """``linear``: linear in sqrt(beta) (the original "linear"); ``cosine``: Nichol & Dhariwal."""
    timesteps: int = 1000
    """Number of diffusion steps."""
    linear_start: float = 0.00085
    """First beta of the linear schedule."""
    linear_end: float = 0.012
    """Last beta of the linear schedule."""
    cosine_s: float = 8e-3
    """Offset of the cosine schedule."""
    zero_terminal_snr: bool = False
    """Rescale betas so the last step is pure noise (SNR 0); pairs with the v objective."""
    offset_noise: float = 0.0
    """Strength of per-channel offset noise added to the training noise (0 = off)."""
    min_snr_gamma: float = 0.0
    """Min-SNR-gamma loss weighting (Hang et al. 2023), e.g. 5.0; 0 = off (uniform weights)."""

    def __post_init__(self) -> None:
        require_finite(self)
        if self.timesteps < 2:
            raise ConfigError("must be >= 2", key="timesteps")
        if not 0 < self.linear_start < self.linear_end < 1:
            # Name the value that is out of place: the end when it alone leaves (0, 1).
            bad_end = 0 < self.linear_start < 1 and not 0 < self.linear_end < 1
            raise ConfigError(
                f"needs 0 < linear_start < linear_end < 1, got {self.linear_start}, "
                f"{self.linear_end}",
                key="linear_end" if bad_end else "linear_start",
            )
        require_range(self, "cosine_s", low=0)
        if self.offset_noise < 0:
            raise ConfigError("must be >= 0", key="offset_noise")
        if self.min_snr_gamma < 0:
            raise ConfigError("must be >= 0 (0 turns it off)", key="min_snr_gamma")
        objective = get_parameterization(self.parameterization)
        if self.zero_terminal_snr and not objective.defined_at_zero_snr:
            raise ConfigError(
                f"zero_terminal_snr makes the {objective.name} target undefined at the last "
                "step; use parameterization: v",
                key="zero_terminal_snr",
            )


def make_betas(cfg: DiffusionConfig) -> torch.Tensor:
    """The float64 betas of the configured schedule (before any rescaling)."""
    n = cfg.timesteps
    if cfg.schedule == "linear":
        return (
            torch.linspace(
                math.sqrt(cfg.linear_start), math.sqrt(cfg.linear_end), n, dtype=torch.float64
            )
            ** 2
        )
    steps = torch.arange(n + 1, dtype=torch.float64) / n + cfg.cosine_s
    alphas = torch.cos(steps / (1 + cfg.cosine_s) * math.pi / 2) ** 2
    alphas = alphas / alphas[0]
    return (1 - alphas[1:] / alphas[:-1]).clamp(0, 0.999)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so it keeps its first value and ends at exactly 0."""
    sqrt_ab = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alphas_bar = sqrt_ab**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def _gather(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] shaped (B, 1, 1, ...) to broadcast over ``like``."""
    out = values.to(t.device)[t].to(like.dtype)
    return out.reshape(t.shape[0], *([1] * (like.ndim - 1)))


class NoiseSchedule(torch.nn.Module):
    """The original's twelve schedule buffers and the maths that uses them.

    The buffers are non-persistent here: the trainer's checkpoint stores the config that recreates
    them, and the export writes them in the original layout (``original_buffers()``).
    """

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    log_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor

    def __init__(self, cfg: DiffusionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.parameterization: Parameterization = get_parameterization(cfg.parameterization)
        for name, value in self.compute_float64(cfg).items():
            self.register_buffer(name, value.to(torch.float32), persistent=False)

    @staticmethod
    def compute_float64(cfg: DiffusionConfig) -> dict[str, torch.Tensor]:
        """Every buffer in float64, by the original's formulas (``v_posterior = 0``)."""
        betas = make_betas(cfg)
        if cfg.zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        alphas = 1.0 - betas
        ab = torch.cumprod(alphas, dim=0)
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        posterior_variance = betas * (1.0 - ab_prev) / (1.0 - ab)
        return {
            "betas": betas,
            "alphas_cumprod": ab,
            "alphas_cumprod_prev": ab_prev,
            "sqrt_alphas_cumprod": ab.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - ab).sqrt(),
            "log_one_minus_alphas_cumprod": torch.log(1.0 - ab),
            "sqrt_recip_alphas_cumprod": (1.0 / ab).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / ab - 1).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": torch.log(posterior_variance.clamp(min=1e-20)),
            "posterior_mean_coef1": betas * ab_prev.sqrt() / (1.0 - ab),
            "posterior_mean_coef2": (1.0 - ab_prev) * alphas.sqrt() / (1.0 - ab),
        }

    @property
    def num_timesteps(self) -> int:
        return self.config.timesteps

    def original_buffers(self) -> dict[str, torch.Tensor]:
        """The twelve float32 buffers under their original (unprefixed) checkpoint names."""
        return {name: getattr(self, name).detach().cpu().clone() for name in SCHEDULE_BUFFERS}

    # --- forward process and parameterisations ---------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
        return (
            _gather(self.sqrt_alphas_cumprod, t, x0) * x0
            + _gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def v_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """v = sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x0."""
        return (
            _gather(self.sqrt_alphas_cumprod, t, x0) * noise
            - _gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0
        )

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The regression target of the configured parameterisation."""
        return self.parameterization.target(self, x0, t, noise)

    def x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0 = sqrt(1 / alpha_bar_t) x_t - sqrt(1 / alpha_bar_t - 1) eps."""
        return (
            _gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - _gather(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def x0_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v."""
        return (
            _gather(self.sqrt_alphas_cumprod, t, x_t) * x_t
            - _gather(self.sqrt_one_minus_alphas_cumprod, t, x_t) * v
        )

    def eps_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """eps = sqrt(alpha_bar_t) v + sqrt(1 - alpha_bar_t) x_t."""
        return (
            _gather(self.sqrt_alphas_cumprod, t, x_t) * v
            + _gather(self.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t
        )

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """eps = (sqrt(1 / alpha_bar_t) x_t - x0) / sqrt(1 / alpha_bar_t - 1)."""
        return (_gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / _gather(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    def to_eps_and_x0(
        self, x_t: torch.Tensor, t: torch.Tensor, model_output: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, x0) predicted by a model output of the configured parameterisation."""
        return self.parameterization.to_eps_and_x0(self, x_t, t, model_output)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t), shape (B,)."""
        ab = self.alphas_cumprod.to(t.device)[t].double()
        return (ab / (1.0 - ab)).float()
