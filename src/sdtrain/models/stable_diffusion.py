"""The four parts of a Stable Diffusion model together, and their bridge to original checkpoints.

``StableDiffusion`` holds the trainable UNet, the frozen autoencoder and text encoder and the noise
schedule built from one ``ModelConfig``. It loads an original-layout checkpoint part by part
(strict, with errors naming the file and the keys), widening a 4-channel UNet to the configured
5 or 9 input channels with zero-initialised extra channels, and gives its weights back in the
original layout. Base, inpainting and depth models differ only in their conditioning component
(``models.conditioning``, chosen by ``model.conditioning``): what is concatenated to the latents.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from sdtrain.diffusion.schedule import NoiseSchedule
from sdtrain.errors import CheckpointError
from sdtrain.models.adapters.original import (
    UNET_INPUT_CONV,
    OriginalCheckpoint,
    load_state_dict_strict,
    widen_input_channels,
)
from sdtrain.models.autoencoder import AutoencoderKL
from sdtrain.models.conditioning import (
    ConditioningComponent,
    UNetConditioning,
    conditioning_component,
)
from sdtrain.models.midas import MiDaS, build_midas, read_midas_weights
from sdtrain.models.text_encoders import FrozenTextEncoder, TextStateDictError
from sdtrain.models.unet import UNetModel
from sdtrain.models.upscaling import LowResNoise

if TYPE_CHECKING:
    from sdtrain.models.config import ModelConfig


@dataclass
class LoadReport:
    """What ``StableDiffusion.load_original`` took from a checkpoint."""

    loaded: list[str] = field(default_factory=list)
    """Parts loaded: any of "unet", "vae", "text", "depth"."""
    widened_from: int | None = None
    """The checkpoint UNet's input channels when it was widened, else None."""
    ema: dict[str, torch.Tensor] | None = None
    """The checkpoint's EMA UNet weights (widened like the UNet), for the trainer's EMA."""


def freeze(module: nn.Module) -> nn.Module:
    """No gradients and eval mode, for the frozen first stage."""
    module.requires_grad_(False)
    return module.eval()


class StableDiffusion(nn.Module):
    """UNet (trainable), autoencoder and text encoder (frozen), schedule: one model config."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.unet = UNetModel(cfg.unet)
        self.autoencoder = freeze(AutoencoderKL(cfg.autoencoder))
        self.text_encoder = FrozenTextEncoder(cfg.text_encoder)
        self.schedule = NoiseSchedule(cfg.diffusion)
        estimator = conditioning_component(cfg.conditioning).frozen_estimator(cfg.depth)
        self.depth_estimator: MiDaS | None = build_midas(estimator) if estimator else None
        """The frozen MiDaS of ``model.depth.source: midas`` (original ``depth_model``)."""
        self.low_scale_model: LowResNoise | None = conditioning_component(
            cfg.conditioning
        ).noise_augmentation(cfg.upscale)
        """An upscaler's low-res noise augmentation (original ``low_scale_model``)."""
        self.carried_depth: dict[str, torch.Tensor] = {}
        """``depth_model.*`` of the loaded checkpoint when the model holds no estimator
        (``model.depth.source: shard``): not used, not in ``state_dict()``, written back unchanged
        by ``original_parts`` so a round trip of an original depth file keeps them."""

    def train(self, mode: bool = True) -> StableDiffusion:
        """The UNet trains; the first stage stays in eval mode, and so does the text encoder
        unless it trains (``FrozenTextEncoder.trains``)."""
        self.training = mode
        self.unet.train(mode)
        self.text_encoder.train(mode)
        return self

    def depth_from_images(
        self, images: torch.Tensor, size: tuple[int, int] | None = None, eps: float = 1e-3
    ) -> torch.Tensor | None:
        """The estimator's depth channel (B, 1, h, w) in [-1, 1] for images (B, 3, H, W) in
        [-1, 1], at ``size`` (default the images'); None without an estimator."""
        if self.depth_estimator is None:
            return None
        return self.depth_estimator.conditioning(images, size or tuple(images.shape[-2:]), eps)

    def load_depth_weights(self, path: str) -> None:
        """The estimator's weights from a MiDaS file or a depth checkpoint (strict)."""
        if self.depth_estimator is None:
            raise CheckpointError(
                "model.depth.weights is set but the model has no depth estimator "
                "(model.depth.source: midas)",
                path,
            )
        weights = read_midas_weights(path)
        load_state_dict_strict(self.depth_estimator, weights, source=path, what="MiDaS")

    # --- latents and conditioning -----------------------------------------------------------

    @torch.no_grad()
    def encode_images(
        self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True
    ) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/8, W/8).

        ``sample`` draws from the posterior as the original training does; False takes its mean.
        """
        posterior = self.autoencoder.encode(images.to(self.frozen_dtype))
        latents = posterior.sample(generator) if sample else posterior.mode()
        return latents.float() * self.config.autoencoder.scale_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] (clamped)."""
        scaled = (latents / self.config.autoencoder.scale_factor).to(self.frozen_dtype)
        return self.autoencoder.decode(scaled).float().clamp(-1, 1)

    @property
    def frozen_dtype(self) -> torch.dtype:
        """The dtype the autoencoder is held in (``hold_frozen_in``; float32 by default)."""
        return self.autoencoder.decoder.conv_out.weight.dtype

    def hold_frozen_in(self, dtype: torch.dtype) -> None:
        """Hold the frozen autoencoder and text encoder in ``dtype`` (``model.frozen_dtype``);
        ``encode_images``, ``decode_latents`` and the text context stay float32. A text encoder
        that trains (``FrozenTextEncoder.trains``) stays float32."""
        self.autoencoder.to(dtype)
        if not self.text_encoder.trains:
            self.text_encoder.to(dtype)

    @property
    def conditioning(self) -> ConditioningComponent:
        """The component of ``model.conditioning``: what the UNet sees besides the latents."""
        return conditioning_component(self.config.conditioning)

    def conditioning_channels(
        self,
        latents_hw: tuple[int, int],
        mask: torch.Tensor | None = None,
        masked_image_latents: torch.Tensor | None = None,
        depth: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """The channels concatenated after the noisy latents, at latent size, from encoded parts
        (see ``ConditioningComponent.channels``): inpainting mask + masked-image latents, depth
        map; None for text-to-image."""
        parts = {"mask": mask, "masked_image_latents": masked_image_latents, "depth": depth}
        given = {k: v for k, v in parts.items() if v is not None}
        return self.conditioning.channels(latents_hw, given)

    def unet_input(self, noisy: torch.Tensor, conditioning: torch.Tensor | None) -> torch.Tensor:
        """cat([noisy latents, conditioning]) along channels, as the original ``hybrid`` mode."""
        return UNetConditioning(conditioning).unet_input(noisy)

    # --- original checkpoints ---------------------------------------------------------------

    def load_original(
        self, ckpt: OriginalCheckpoint, parts: tuple[str, ...] | None = None
    ) -> LoadReport:
        """Load the requested parts strictly; widen a narrower UNet input conv with zeros.

        ``parts`` default: UNet, VAE and text, and "depth" (``depth_model.*``) when the model
        has a depth estimator. Without one, a loaded UNet's ``depth_model.*`` are carried
        (``carried_depth``)."""
        source = str(ckpt.path) if ckpt.path is not None else "<state dict>"
        report = LoadReport()
        if parts is None:
            parts = ("unet", "vae", "text", "depth")[: 4 if self.depth_estimator else 3]
        if "depth" in parts and self.depth_estimator is not None and not ckpt.depth:
            raise CheckpointError(
                "has no depth_model.* weights for the depth estimator (model.depth.source: "
                "midas): pass the MiDaS weights file with "
                "model.depth.weights=dpt_hybrid-midas-501f0c75.pt",
                source,
            )
        for part in parts:
            weights = {"unet": ckpt.unet, "vae": ckpt.vae, "text": ckpt.text, "depth": ckpt.depth}
            weights = weights[part]
            if not weights:
                raise CheckpointError(f"has no {part} weights", source)
        if "unet" in parts:
            unet_sd, report.widened_from = self._fit_input_channels(ckpt.unet, source)
            load_state_dict_strict(self.unet, unet_sd, source=source, what="UNet")
            if ckpt.ema:
                report.ema, _ = self._fit_input_channels(ckpt.ema, source)
            report.loaded.append("unet")
        if "vae" in parts:
            load_state_dict_strict(self.autoencoder, ckpt.vae, source=source, what="autoencoder")
            report.loaded.append("vae")
        if "text" in parts:
            try:
                self.text_encoder.load_original_state_dict(ckpt.text)
            except TextStateDictError as err:
                raise CheckpointError(f"text encoder: {err}", source) from err
            report.loaded.append("text")
        if "depth" in parts and self.depth_estimator is not None:
            load_state_dict_strict(self.depth_estimator, ckpt.depth, source=source, what="MiDaS")
            report.loaded.append("depth")
        elif "unet" in parts and self.depth_estimator is None:
            self.carried_depth = dict(ckpt.depth)
        self._check_schedule(ckpt.schedule, source)
        self._check_low_scale(ckpt.low_scale, source)
        return report

    def _fit_input_channels(
        self, unet_sd: dict[str, torch.Tensor], source: str
    ) -> tuple[dict[str, torch.Tensor], int | None]:
        want = self.config.unet.in_channels
        weight = unet_sd.get(UNET_INPUT_CONV)
        if weight is None or weight.ndim != 4 or weight.shape[1] == want:
            return unet_sd, None
        if not self.conditioning.widens_base:
            raise CheckpointError(
                f"holds a UNet with {weight.shape[1]} input channels but {self.config.name!r} is "
                f"{self.conditioning.article()} {self.conditioning.description} model with "
                f"{want} ({UNET_INPUT_CONV}): not a checkpoint of this kind",
                source,
            )
        try:
            return widen_input_channels(unet_sd, want), int(weight.shape[1])
        except CheckpointError as err:
            raise err.at(source) from None

    def _check_schedule(self, buffers: dict[str, torch.Tensor], source: str) -> None:
        """A checkpoint trained with other betas would be silently mis-sampled: refuse it."""
        betas = buffers.get("betas")
        if betas is None:
            return
        ours = self.schedule.betas
        if betas.shape != ours.shape or not torch.allclose(betas.float(), ours, rtol=1e-5):
            raise CheckpointError(
                "its noise schedule (betas) differs from the configured model.diffusion "
                f"({self.config.diffusion.schedule}, {self.config.diffusion.timesteps} steps)",
                source,
            )

    def _check_low_scale(self, buffers: dict[str, torch.Tensor], source: str) -> None:
        """An upscaler file's low-res noise schedule must be the configured one."""
        if self.low_scale_model is None or not buffers:
            return
        ours = self.low_scale_model.original_buffers()
        for name, value in buffers.items():
            if name not in ours:
                raise CheckpointError(f"unknown buffer low_scale_model.{name}", source)
            if value.shape != ours[name].shape or not torch.allclose(
                value.float(), ours[name], rtol=1e-5
            ):
                raise CheckpointError(
                    f"its low-res noise schedule (low_scale_model.{name}) differs from the "
                    "configured model.upscale (linear_start/linear_end/timesteps)",
                    source,
                )

    def original_parts(self, ema: dict[str, torch.Tensor] | None = None) -> dict[str, dict]:
        """Keyword arguments for ``write_checkpoint``: every part in the original layout."""
        parts: dict[str, dict] = {
            "unet": {k: v.detach() for k, v in self.unet.state_dict().items()},
            "vae": {k: v.detach() for k, v in self.autoencoder.state_dict().items()},
            "text": self.text_encoder.original_state_dict(),
            "schedule": self.schedule.original_buffers(),
        }
        if self.depth_estimator is not None:
            parts["depth"] = {k: v.detach() for k, v in self.depth_estimator.state_dict().items()}
        elif self.carried_depth:
            parts["depth"] = dict(self.carried_depth)
        if self.low_scale_model is not None:
            parts["low_scale"] = self.low_scale_model.original_buffers()
        if ema is not None:
            parts["ema"] = ema
        return parts


def build_stable_diffusion(
    cfg: ModelConfig, device: torch.device | str | None = None
) -> StableDiffusion:
    """Build all parts, randomly initialised; ``device="meta"`` allocates nothing."""
    if device is None:
        return StableDiffusion(cfg)
    with torch.device(device):
        return StableDiffusion(cfg)
