"""The x4 upscaler's low-res noise augmentation (original ``ImageConcatWithNoiseAugmentation``).

The low-res image stays in pixel space ([-1, 1], the latents' spatial size: the f=4 autoencoder
makes a 512 px target a 128 px latent). Before it is concatenated to the noisy latents it is
noised with its own image-space DDPM schedule (linear in sqrt(beta), 1e-4 -> 0.02 over 1000
steps, the 8 buffers the original saves as ``low_scale_model.*``) to a noise level in
[0, max_noise_level); that level is the UNet's class label ``y``. Training draws the level per
sample; sampling takes the user's (default 20, as the original scripts). Level 0 still adds 1%
noise, as the original.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from sdtrain.data.degradation import DegradationConfig
from sdtrain.diffusion.schedule import SCHEDULE_BUFFERS, DiffusionConfig, NoiseSchedule
from sdtrain.errors import ConfigError
from sdtrain.utils.checks import require_finite, require_range

# The buffers the original's low_scale_model registers (and saves), in its order.
LOW_SCALE_BUFFERS = SCHEDULE_BUFFERS[:8]


@dataclass
class UpscaleConfig:
    """An x4 upscaler's low-res input (``model.upscale``; original ``low_scale_config``)."""

    factor: int = 4
    """Target side / low-res side; must equal the autoencoder's downsampling factor."""
    max_noise_level: int = 350
    """Noise levels are in [0, max_noise_level]; training draws them in [0, max_noise_level)."""
    linear_start: float = 1e-4
    """First beta of the low-res image's own noise schedule."""
    linear_end: float = 0.02
    """Last beta of that schedule."""
    timesteps: int = 1000
    """Steps of that schedule (the noise level indexes it)."""
    noise_level: int = 20
    """The noise level ``sdtrain sample`` and validation grids use unless told otherwise."""
    max_input_size: int = 256
    """Largest low-res side ``sdtrain sample`` accepts (tiling larger inputs is not supported)."""
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    """How training makes the low-res input from the target crop."""

    def __post_init__(self) -> None:
        require_finite(self)
        require_range(self, "factor", "timesteps", "max_input_size", low=1)
        if not 0 <= self.max_noise_level < self.timesteps:
            raise ConfigError(
                f"must be in [0, timesteps={self.timesteps}), got {self.max_noise_level}",
                key="max_noise_level",
            )
        if not 0 <= self.noise_level <= self.max_noise_level:
            raise ConfigError(
                f"must be in [0, max_noise_level={self.max_noise_level}], got {self.noise_level}",
                key="noise_level",
            )
        DiffusionConfig(  # the same checks as the main schedule's
            linear_start=self.linear_start, linear_end=self.linear_end, timesteps=self.timesteps
        )

    def schedule(self) -> DiffusionConfig:
        return DiffusionConfig(
            schedule="linear", linear_start=self.linear_start, linear_end=self.linear_end,
            timesteps=self.timesteps,
        )  # fmt: skip


class LowResNoise(nn.Module):
    """``q_sample`` of the low-res image at a noise level; the original's 8 schedule buffers."""

    betas: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor

    def __init__(self, cfg: UpscaleConfig) -> None:
        super().__init__()
        self.config = cfg
        with torch.device("cpu"):  # 8 x 1000 numbers: real even in a model built on "meta"
            values = NoiseSchedule.compute_float64(cfg.schedule())
        for name in LOW_SCALE_BUFFERS:
            # Non-persistent like NoiseSchedule's: the config recreates them, exports write them.
            self.register_buffer(name, values[name].to(torch.float32), persistent=False)

    def original_buffers(self) -> dict[str, Tensor]:
        """The 8 float32 buffers under their names after ``low_scale_model.``."""
        return {name: getattr(self, name).detach().cpu().clone() for name in LOW_SCALE_BUFFERS}

    def check_levels(self, levels: Tensor) -> None:
        """A ConfigError naming the first level outside [0, max_noise_level]."""
        top = self.config.max_noise_level
        bad = levels[(levels < 0) | (levels > top)]
        if len(bad):
            raise ConfigError(
                f"noise level {int(bad[0])} is outside [0, {top}] (model.upscale.max_noise_level)"
            )

    def draw_levels(
        self, n: int, generator: torch.Generator | None, device: torch.device
    ) -> Tensor:
        """Training: one level per sample in [0, max_noise_level), as the original ``randint``."""
        top = max(self.config.max_noise_level, 1)
        return torch.randint(0, top, (n,), generator=generator, device=device)

    def forward(self, low: Tensor, levels: Tensor, noise: Tensor) -> Tensor:
        """sqrt(ab[level]) low + sqrt(1 - ab[level]) noise, coefficients gathered in float32."""
        self.check_levels(levels)
        shape = (len(levels), *([1] * (low.ndim - 1)))
        signal = self.sqrt_alphas_cumprod.to(levels.device)[levels].view(shape)
        scale = self.sqrt_one_minus_alphas_cumprod.to(levels.device)[levels].view(shape)
        return signal.to(low.dtype) * low + scale.to(low.dtype) * noise  # (B, 3, h, w)
