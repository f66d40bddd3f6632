"""``ModelConfig``: a complete Stable Diffusion model (UNet, first stage, text encoder, diffusion
process), what ``configs/models/*.yaml`` fill in.

Cross-component rules live in ``ModelConfig.__post_init__``: the UNet's context width must be the
text encoder's, its outputs the latent channels, and its inputs the latents plus whatever the
conditioning concatenates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sdtrain.diffusion.schedule import DiffusionConfig
from sdtrain.errors import ConfigError
from sdtrain.models.autoencoder import AutoencoderConfig
from sdtrain.models.conditioning import (
    Conditioning,
    DepthConfig,
    conditioning_component,
    extra_input_channels,
)
from sdtrain.models.text_encoders import TextEncoderConfig
from sdtrain.models.unet import UNetConfig
from sdtrain.models.upscaling import UpscaleConfig

__all__ = ["Conditioning", "DepthConfig", "ModelConfig", "UpscaleConfig", "extra_input_channels"]


@dataclass
class ModelConfig:
    """A complete Stable Diffusion model: UNet, first stage, text encoder and diffusion process."""

    name: str = "custom"
    """A label for logs and exported files (e.g. ``sd15-inpainting``)."""
    conditioning: Conditioning = "txt2img"
    """What the UNet sees besides the noisy latents: nothing, inpainting mask + masked image
    latents (9 input channels), a depth map (5 input channels) or an x4 upscaler's noise-augmented
    low-res image (7 input channels, plus its noise level as the UNet's class label)."""
    unet: UNetConfig = field(default_factory=UNetConfig)
    """The denoiser (original ``unet_config.params``)."""
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    """The first stage (original ``first_stage_config.params``)."""
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    """The frozen text encoder (SD1 CLIP ViT-L/14 or SD2 OpenCLIP ViT-H/14)."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """Noise schedule and objective."""
    depth: DepthConfig = field(default_factory=DepthConfig)
    """Depth models: where the depth channel comes from (shards or the frozen MiDaS)."""
    upscale: UpscaleConfig = field(default_factory=UpscaleConfig)
    """Upscalers: the low-res input's factor, noise schedule and levels, and its degradation."""
    frozen_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """While training (``sdtrain fit``): the frozen autoencoder and text encoder are held in this
    dtype (half their memory in bf16 / fp16); their outputs are cast back to float32 for the
    UNet. Exports and sampling from files keep float32."""

    def __post_init__(self) -> None:
        latent = self.autoencoder.embed_dim
        if self.unet.out_channels != latent:
            raise ConfigError(
                f"is {self.unet.out_channels} but the autoencoder has {latent} latent channels "
                "(autoencoder.embed_dim)",
                key="unet.out_channels",
            )
        expected_in = latent + extra_input_channels(self.conditioning, latent)
        if self.unet.in_channels != expected_in:
            raise ConfigError(
                f"is {self.unet.in_channels} but conditioning '{self.conditioning}' with {latent} "
                f"latent channels needs {expected_in}",
                key="unet.in_channels",
            )
        if self.depth.source != "shard" and not conditioning_component(
            self.conditioning
        ).frozen_estimator(self.depth):
            raise ConfigError(
                f"is {self.depth.source!r} but a '{self.conditioning}' model has no depth "
                "channel (conditioning: depth)",
                key="depth.source",
            )
        conditioning_component(self.conditioning).check_model(self)
        if self.unet.context_dim != self.text_encoder.width:
            raise ConfigError(
                f"is {self.unet.context_dim} but the text encoder width is "
                f"{self.text_encoder.width} (text_encoder.width)",
                key="unet.context_dim",
            )

    @property
    def latent_downsampling(self) -> int:
        """Image pixels per latent pixel along each side (8 for SD)."""
        return self.autoencoder.downsampling_factor
