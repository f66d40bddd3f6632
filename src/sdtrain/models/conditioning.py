"""What the UNet sees besides the noisy latents, one component per ``model.conditioning``.

The registry ``CONDITIONINGS`` is the only place in sdtrain that tells the modes apart. A
component turns what a mode is given into ``UNetConditioning``: the channels concatenated after
the noisy latents and any further UNet inputs (``kwargs``). It is given either

- a training or held-out batch (``from_batch``: the mask or depth map the loader made), with the
  frozen models and the step's generator, drawing in a fixed order after the image latents; or
- sampling inputs in pixel space (``from_inputs``: ``sdtrain sample``'s image and mask, the
  fixed inputs of validation grids and smoke), encoded to the posterior mode.

For classifier-free guidance, ``unconditional`` says what the unconditional branch sees: every
mode here keeps its channels (the image is not what guidance contrasts; only the text is).

The modes, with ``C`` latent channels (4 for SD):

- ``txt2img``: nothing (UNet input C channels);
- ``inpainting``: the mask resized nearest to latent size (1) + the latents of the masked image
  ``image * (1 - mask)`` (C): C + 1 + C channels, as the original ``hybrid`` mode;
- ``depth``: a depth map in [-1, 1] resized bicubic (1): C + 1 channels; from the shards, or
  (``model.depth.source: midas``) computed from the images by the frozen MiDaS
  (``models.midas``), as the original ``LatentDepth2ImageDiffusion``.

- ``upscale``: the x4 upscaler (original ``LatentUpscaleDiffusion``): a low-res RGB image at
  latent size, noise-augmented to a noise level (``models.upscaling``), is concatenated (3):
  C + 3 channels, and the level is the UNet's class label ``kwargs["y"]``, which the
  unconditional branch keeps, as the original. Training makes the low-res image from the target
  crop (``data.degradation``) and draws the level per sample from the step's generator.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from sdtrain.data.degradation import degrade, downscale
from sdtrain.data.transforms import masked_images
from sdtrain.diffusion.samplers import KnownRegion
from sdtrain.errors import ConfigError
from sdtrain.models.midas import SCRIPT_EPS
from sdtrain.models.upscaling import LowResNoise, UpscaleConfig

Conditioning = Literal["txt2img", "inpainting", "depth", "upscale"]


class FirstStage(Protocol):
    """What a component uses of the model (a ``StableDiffusion``): its frozen first stage and,
    for ``depth.source: midas``, its frozen depth estimator (None otherwise)."""

    depth_estimator: Any
    low_scale_model: LowResNoise | None

    def encode_images(
        self, images: Tensor, generator: torch.Generator | None = None, sample: bool = True
    ) -> Tensor: ...


# ---------------------------------------------------------------------------------------------
# What goes in and what comes out
# ---------------------------------------------------------------------------------------------


@dataclass
class UNetConditioning:
    """Everything the UNet takes besides the noisy latents, the timestep and the text context."""

    concat: Tensor | None = None
    """(B, C', h, w): channels concatenated after the noisy latents; None for none."""
    kwargs: dict[str, Tensor] = field(default_factory=dict)
    """Further UNet inputs by keyword, batch first (an upscaler's noise-level label ``y``)."""

    def unet_input(self, noisy: Tensor) -> Tensor:
        """cat([noisy latents, channels]) along channels: (B, C + C', h, w)."""
        if self.concat is None:
            return noisy
        return torch.cat([noisy, self.concat.to(noisy.dtype)], dim=1)

    def expand(self, n: int) -> UNetConditioning:
        """The same conditioning for a batch of ``n`` (from a batch of 1 or of ``n``)."""
        concat = None if self.concat is None else self.concat.expand(n, -1, -1, -1)
        kwargs = {k: v.expand(n, *v.shape[1:]) for k, v in self.kwargs.items()}
        return UNetConditioning(concat, kwargs)


@dataclass
class ConditioningInputs:
    """What a conditioned model is given at sampling time, in pixel space, batch 1 or B."""

    image: Tensor | None = None
    """(B, 3, H, W) in [-1, 1]: the picture to repaint (inpainting) or shown beside the depth."""
    mask: Tensor | None = None
    """(B, 1, H, W): 1 (>= 0.5) = repaint."""
    depth: Tensor | None = None
    """(B, 1, H, W) in [-1, 1]."""
    noise_level: Tensor | None = None
    """(B,) int64: the x4 upscaler's noise level of its low-res ``image`` (default: configured)."""
    target: Tensor | None = None
    """(B, 3, H, W) in [-1, 1]: the high-res original of an upscaler's ``image`` (grids only)."""

    def given(self) -> set[str]:
        """The names of the inputs present."""
        return {f.name for f in fields(self) if getattr(self, f.name) is not None}

    def select(self, part: slice) -> ConditioningInputs:
        """The inputs of the prompts in ``part``; a batch of 1 serves every prompt."""
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            picked[f.name] = value if value is None or len(value) == 1 else value[part]
        return ConditioningInputs(**picked)

    def to(self, device: torch.device | str) -> ConditioningInputs:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return ConditioningInputs(**{k: v if v is None else v.to(device) for k, v in moved.items()})


def box_mask(count: int, size: int, device: torch.device | str | None = None) -> Tensor:
    """A fixed inpainting mask: a centre box of half the side (1 = repaint); (N, 1, S, S)."""
    mask = torch.zeros(count, 1, size, size, device=device)
    mask[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1.0
    return mask


def stand_in_depth(images: Tensor) -> Tensor:
    """Brightness as a stand-in depth map in [-1, 1], per image; (N, 1, S, S)."""
    depth = images.mean(dim=1, keepdim=True)  # (N, 1, S, S)
    low = depth.amin(dim=(1, 2, 3), keepdim=True)
    high = depth.amax(dim=(1, 2, 3), keepdim=True)
    return 2 * (depth - low) / (high - low + 1e-3) - 1


# ---------------------------------------------------------------------------------------------
# The components
# ---------------------------------------------------------------------------------------------


class ConditioningComponent:
    """One ``model.conditioning`` mode; the base class is text-to-image (nothing extra)."""

    name: ClassVar[str]
    description: ClassVar[str]
    """For messages: "a {description} model"."""
    data_sections: ClassVar[tuple[str, ...]] = ()
    """``data.<section>.enabled`` must be true to train this mode (the loader makes the inputs)."""
    sample_inputs: ClassVar[tuple[str, ...]] = ()
    """The ``ConditioningInputs`` fields ``from_inputs`` needs."""
    optional_inputs: ClassVar[tuple[str, ...]] = ()
    """Fields it accepts without needing them (shown beside the result)."""
    parts: ClassVar[tuple[str, ...]] = ()
    """The encoded parts ``channels`` concatenates."""
    widens_base: ClassVar[bool] = True
    """A 4-channel base UNet may initialise this mode, widened with zero input channels."""
    diffusers_pipeline: ClassVar[str] = "StableDiffusionPipeline"
    """The diffusers pipeline class that loads a model folder of this mode."""
    trains_text_encoder: ClassVar[bool] = True
    """``finetune.train_text_encoder`` is meaningful: the prompt steers what this mode draws."""
    image_to_image: ClassVar[bool] = False
    """``sdtrain sample --image`` repaints the image from its latents noised to ``--strength``
    (the original depth2img script); the mode's own inputs may come from the image."""

    def extra_channels(self, latent_channels: int) -> int:
        """Channels concatenated after ``latent_channels`` noisy latent channels."""
        return 0

    def required_data(self, depth: DepthConfig) -> tuple[str, ...]:
        """The ``data.<section>.enabled`` switches training needs (``data_sections``)."""
        return self.data_sections

    def frozen_estimator(self, depth: DepthConfig) -> str | None:
        """The name of the frozen estimator the model must hold (``models.midas``), or None."""
        return None

    def needs_pixels(self, depth: DepthConfig) -> bool:
        """Whether a training step needs the images besides their latents: with cached latents
        (``data.latents``) ``data encode`` then keeps the crop in the latent shard."""
        return False

    def noise_augmentation(self, cfg: UpscaleConfig) -> LowResNoise | None:
        """The low-res noise augmentation the model must hold (``models.upscaling``), or None."""
        return None

    def check_model(self, cfg: Any) -> None:
        """Rules a ``ModelConfig`` of this mode must keep beyond the channel count."""

    def channels(self, latent_hw: tuple[int, int], parts: Mapping[str, Tensor]) -> Tensor | None:
        """The concatenated channels (B, C', h, w) from already-encoded ``parts``."""
        missing = [p for p in self.parts if parts.get(p) is None]
        if missing:
            raise ValueError(f"{self.article()} {self.description} model needs {_and(missing)}")
        return None

    def from_batch(
        self,
        model: FirstStage,
        batch: Mapping[str, Any],
        images: Tensor | None,
        latents: Tensor,
        generator: torch.Generator | None,
    ) -> UNetConditioning:
        """Training / held-out: ``images`` (B, 3, H, W) in [-1, 1] on the model's device, their
        ``latents``; random draws (posterior samples) from ``generator``. ``images`` is None
        with cached latents (``data.latents``) for modes that do not ``needs_pixels``."""
        return UNetConditioning()

    def from_inputs(
        self,
        model: FirstStage,
        inputs: ConditioningInputs,
        latent_hw: tuple[int, int],
        generator: torch.Generator | None = None,
    ) -> UNetConditioning:
        """Sampling: pixel-space ``inputs`` -> conditioning at ``latent_hw``; only the upscaler
        draws (its noise augmentation, from ``generator``)."""
        self.check_inputs(inputs.given())
        return UNetConditioning()

    def latent_size(self, inputs: ConditioningInputs) -> tuple[int, int] | None:
        """The latent size the inputs fix (an upscaler's low-res image), or None."""
        return None

    def unconditional(self, cond: UNetConditioning) -> UNetConditioning:
        """What the unconditional branch of classifier-free guidance sees: all of it."""
        return cond

    def known_region(
        self, model: FirstStage, inputs: ConditioningInputs, latent_hw: tuple[int, int]
    ) -> KnownRegion | None:
        """Latents to hold while sampling (``keep_unmasked``); None where the mode has none."""
        return None

    def stand_in_inputs(self, images: Tensor, depth: Tensor | None = None) -> ConditioningInputs:
        """Fixed sampling inputs built from ``images`` (N, 3, S, S) (validation grids, smoke):
        a centre box mask, the given ``depth`` or a brightness stand-in."""
        return ConditioningInputs()

    def pictures(self, inputs: ConditioningInputs) -> dict[str, Tensor]:
        """What conditioned the model, as pictures in [-1, 1]; the first is ``hint_picture``."""
        return {}

    def hint_picture(self, inputs: ConditioningInputs) -> Tensor | None:
        """The one picture (N, 1, S, S) in [-1, 1] a grid shows beside the input: mask / depth."""
        pictures = self.pictures(inputs)
        return next(iter(pictures.values())) if pictures else None

    def grid_pictures(self, inputs: ConditioningInputs, results: Tensor) -> list[Tensor]:
        """The rows of a validation grid, each (N, C, S, S) in [-1, 1]: [results] or
        [input, mask / depth, results]."""
        hint = self.hint_picture(inputs)
        if inputs.image is None or hint is None:
            return [results]
        return [inputs.image, hint, results]

    def check_inputs(self, given: set[str], model_name: str = "the model") -> None:
        """Sampling inputs this mode needs or cannot use: a ConfigError naming them."""
        needs, unused = (
            set(self.sample_inputs),
            given - {*self.sample_inputs, *self.optional_inputs},
        )
        if needs - given:
            raise ConfigError(
                f"{model_name} is {self.article()} {self.description} model: sampling needs "
                f"{_and(sorted(needs - given))}"
            )
        if unused:
            raise ConfigError(
                f"{model_name} is {self.article()} {self.description} model: "
                f"{_and(sorted(unused))} not used"
            )

    def article(self) -> str:
        return "an" if self.description[0] in "aeiou" else "a"


class TextToImage(ConditioningComponent):
    """The base model: the UNet sees the noisy latents only."""

    name = "txt2img"
    description = "text-to-image"


class Inpainting(ConditioningComponent):
    """Mask + masked-image latents (SD 1.5 / SD 2 inpainting, the original ``hybrid`` mode)."""

    name = "inpainting"
    diffusers_pipeline = "StableDiffusionInpaintPipeline"
    description = "inpainting"
    data_sections = ("masks",)
    sample_inputs = ("image", "mask")
    parts = ("mask", "masked_image_latents")

    def extra_channels(self, latent_channels: int) -> int:
        return 1 + latent_channels

    def needs_pixels(self, depth: DepthConfig) -> bool:
        return True  # the masked image is encoded per step: its mask is drawn per step

    def channels(self, latent_hw: tuple[int, int], parts: Mapping[str, Tensor]) -> Tensor | None:
        """mask (B, 1, H, W) resized nearest + masked-image latents (B, C, h, w)."""
        super().channels(latent_hw, parts)
        latents = parts["masked_image_latents"]
        small = F.interpolate(parts["mask"].float(), size=latent_hw, mode="nearest")
        return torch.cat([small.to(latents.dtype), latents], dim=1)  # (B, 1 + C, h, w)

    def from_batch(
        self,
        model: FirstStage,
        batch: Mapping[str, Any],
        images: Tensor,
        latents: Tensor,
        generator: torch.Generator | None,
    ) -> UNetConditioning:
        mask = batch["mask"].to(images.device)  # (B, 1, H, W) {0, 1}
        # The posterior sample is drawn after the image latents' (the order training has).
        masked = model.encode_images(masked_images(images, mask), generator=generator)
        parts = {"mask": mask, "masked_image_latents": masked}
        return UNetConditioning(self.channels(tuple(latents.shape[-2:]), parts))

    def from_inputs(
        self,
        model: FirstStage,
        inputs: ConditioningInputs,
        latent_hw: tuple[int, int],
        generator: torch.Generator | None = None,
    ) -> UNetConditioning:
        """As the original ``scripts/inpaint``: the mask binarised at 0.5, the masked image
        ``image * (mask < 0.5)`` encoded to its posterior mode."""
        self.check_inputs(inputs.given())
        assert inputs.image is not None and inputs.mask is not None
        mask = (inputs.mask >= 0.5).to(inputs.image.dtype)  # (B, 1, H, W), 1 = repaint
        masked = model.encode_images(masked_images(inputs.image, mask), sample=False)
        return UNetConditioning(
            self.channels(latent_hw, {"mask": mask, "masked_image_latents": masked})
        )

    def known_region(
        self, model: FirstStage, inputs: ConditioningInputs, latent_hw: tuple[int, int]
    ) -> KnownRegion | None:
        """The image's latents (mode) in every latent cell whose pixels are all unmasked."""
        assert inputs.image is not None and inputs.mask is not None
        repaint = (inputs.mask >= 0.5).to(inputs.image.dtype)  # (B, 1, H, W)
        touched = F.adaptive_max_pool2d(repaint, latent_hw)  # (B, 1, h, w)
        return KnownRegion(model.encode_images(inputs.image, sample=False), 1 - touched)

    def stand_in_inputs(self, images: Tensor, depth: Tensor | None = None) -> ConditioningInputs:
        return ConditioningInputs(image=images, mask=box_mask(len(images), images.shape[-1]))

    def pictures(self, inputs: ConditioningInputs) -> dict[str, Tensor]:
        assert inputs.image is not None and inputs.mask is not None
        return {
            "mask": inputs.mask * 2 - 1,
            "masked_image": masked_images(inputs.image, inputs.mask),
        }


@dataclass
class DepthConfig:
    """Where a depth model's depth channel comes from (``model.depth``)."""

    source: Literal["shard", "midas"] = "shard"
    """``shard``: depth maps stored in the shards (``data.depth``); ``midas``: the frozen MiDaS
    estimator computes them from the batch's images inside the step, as the original."""
    estimator: Literal["dpt_hybrid", "tiny"] = "dpt_hybrid"
    """The MiDaS size (``models.midas.MIDAS_CONFIGS``); ``tiny`` for tests and the demo."""
    weights: str = ""
    """A MiDaS weights file (``dpt_hybrid-midas-501f0c75.pt``, or any file holding
    ``depth_model.*``) for the estimator when ``init_from`` has no ``depth_model.*``."""

    def __post_init__(self) -> None:
        if self.source not in ("shard", "midas"):
            raise ConfigError(f"is {self.source!r}; choose shard or midas", key="source")
        if self.estimator not in ("dpt_hybrid", "tiny"):
            raise ConfigError(f"is {self.estimator!r}; choose dpt_hybrid or tiny", key="estimator")


class Depth(ConditioningComponent):
    """A depth map (SD 2 depth: MiDaS depth in [-1, 1]), from the shards or computed on the fly
    by the frozen MiDaS (``model.depth.source``)."""

    name = "depth"
    diffusers_pipeline = "StableDiffusionDepth2ImgPipeline"
    description = "depth"
    data_sections = ("depth",)
    sample_inputs = ("depth",)
    optional_inputs = ("image",)
    parts = ("depth",)
    image_to_image = True

    def extra_channels(self, latent_channels: int) -> int:
        return 1

    def channels(self, latent_hw: tuple[int, int], parts: Mapping[str, Tensor]) -> Tensor | None:
        """depth (B, 1, H, W) resized bicubic to (B, 1, h, w)."""
        super().channels(latent_hw, parts)
        return F.interpolate(parts["depth"].float(), size=latent_hw, mode="bicubic")

    def from_batch(
        self,
        model: FirstStage,
        batch: Mapping[str, Any],
        images: Tensor | None,
        latents: Tensor,
        generator: torch.Generator | None,
    ) -> UNetConditioning:
        latent_hw = tuple(latents.shape[-2:])
        if model.depth_estimator is not None:
            assert images is not None, "source: midas needs the images (needs_pixels)"
            # As the original get_input: MiDaS on the images, resized, scaled to [-1, 1].
            return UNetConditioning(model.depth_estimator.conditioning(images, latent_hw))
        depth = batch["depth"].to(latents.device)  # (images are None with cached latents)
        return UNetConditioning(self.channels(latent_hw, {"depth": depth}))

    def required_data(self, depth: DepthConfig) -> tuple[str, ...]:
        return () if depth.source == "midas" else self.data_sections

    def frozen_estimator(self, depth: DepthConfig) -> str | None:
        return depth.estimator if depth.source == "midas" else None

    def needs_pixels(self, depth: DepthConfig) -> bool:
        return depth.source == "midas"

    def from_inputs(
        self,
        model: FirstStage,
        inputs: ConditioningInputs,
        latent_hw: tuple[int, int],
        generator: torch.Generator | None = None,
    ) -> UNetConditioning:
        """The given ``depth`` resized bicubic; without one, the model's MiDaS on ``image``
        scaled as the depth2img scripts do (``depth_conditioning`` with eps 0)."""
        self.check_inputs(inputs.given())
        if inputs.depth is not None:
            return UNetConditioning(self.channels(latent_hw, {"depth": inputs.depth}))
        if model.depth_estimator is None:
            raise ConfigError("the model has no depth estimator (MiDaS): give a depth map")
        return UNetConditioning(
            model.depth_estimator.conditioning(inputs.image, latent_hw, eps=SCRIPT_EPS)
        )

    def check_inputs(self, given: set[str], model_name: str = "the model") -> None:
        """A depth map, or an image for the model's estimator to take the depth from."""
        super().check_inputs(given | ({"depth"} if "image" in given else set()), model_name)

    def stand_in_inputs(self, images: Tensor, depth: Tensor | None = None) -> ConditioningInputs:
        return ConditioningInputs(
            image=images, depth=depth if depth is not None else stand_in_depth(images)
        )

    def pictures(self, inputs: ConditioningInputs) -> dict[str, Tensor]:
        assert inputs.depth is not None
        return {"depth": inputs.depth}


class Upscale(ConditioningComponent):
    """The x4 upscaler: the noise-augmented low-res image (3 channels) + its level as ``y``."""

    name = "upscale"
    diffusers_pipeline = "StableDiffusionUpscalePipeline"
    description = "x4 upscaler"
    sample_inputs = ("image",)
    optional_inputs = ("noise_level", "target")
    widens_base = False
    # Its low-res image fixes the content; the prompt is a weak side input, so a fine-tune
    # adapts it to degradations, not to words.
    trains_text_encoder = False

    def extra_channels(self, latent_channels: int) -> int:
        return 3

    def article(self) -> str:
        return "an"  # "an x4 upscaler"

    def noise_augmentation(self, cfg: UpscaleConfig) -> LowResNoise | None:
        return LowResNoise(cfg)

    def needs_pixels(self, depth: DepthConfig) -> bool:
        return True  # the low-res input is made from the target crop per step

    def check_model(self, cfg: Any) -> None:
        """The low-res image is concatenated at latent size and its level is a class label."""
        factor = cfg.autoencoder.downsampling_factor
        if cfg.upscale.factor != factor:
            raise ConfigError(
                f"is {cfg.upscale.factor} but the autoencoder downsamples by {factor}: the "
                "low-res image is concatenated at latent size",
                key="upscale.factor",
            )
        labels = cfg.unet.num_classes
        if labels is None or labels <= cfg.upscale.max_noise_level:
            raise ConfigError(
                f"is {labels} but an upscaler's noise levels 0..{cfg.upscale.max_noise_level} "
                "are its class labels (x4: num_classes 1000)",
                key="unet.num_classes",
            )

    def _noise(self, model: FirstStage) -> LowResNoise:
        assert model.low_scale_model is not None, "an upscale model holds its low_scale_model"
        return model.low_scale_model

    def augment(
        self, model: FirstStage, low: Tensor, levels: Tensor, generator: torch.Generator | None
    ) -> UNetConditioning:
        """Noise the low-res images (B, 3, h, w) to ``levels`` (B,); the levels become ``y``."""
        noise = torch.randn(low.shape, generator=generator, device=low.device, dtype=low.dtype)
        augmented = self._noise(model)(low, levels, noise)  # (B, 3, h, w)
        return UNetConditioning(augmented, {"y": levels})

    def from_batch(
        self,
        model: FirstStage,
        batch: Mapping[str, Any],
        images: Tensor,
        latents: Tensor,
        generator: torch.Generator | None,
    ) -> UNetConditioning:
        """As the original ``get_input``: the low-res image (made from the target crop by the
        configured degradation), a level per sample in [0, max_noise_level), its noise."""
        noise_model = self._noise(model)
        cfg = noise_model.config
        low = degrade(images, cfg.factor, cfg.degradation, generator)  # (B, 3, h, w)
        self.check_low_res(low, tuple(latents.shape[-2:]), cfg.factor)
        levels = noise_model.draw_levels(len(images), generator, images.device)
        return self.augment(model, low, levels, generator)

    def check_low_res(self, low: Tensor, latent_hw: tuple[int, ...], factor: int) -> None:
        if tuple(low.shape[-2:]) != tuple(latent_hw):
            h, w = low.shape[-2:]
            raise ConfigError(
                f"the low-res image is {h}x{w} but a {latent_hw[0] * factor}x"
                f"{latent_hw[1] * factor} output needs 1/{factor} of it: "
                f"{latent_hw[0]}x{latent_hw[1]}"
            )

    def latent_size(self, inputs: ConditioningInputs) -> tuple[int, int] | None:
        if inputs.image is None:
            return None
        return int(inputs.image.shape[-2]), int(inputs.image.shape[-1])

    def from_inputs(
        self,
        model: FirstStage,
        inputs: ConditioningInputs,
        latent_hw: tuple[int, int],
        generator: torch.Generator | None = None,
    ) -> UNetConditioning:
        """The low-res ``image`` at latent size, noised to ``noise_level`` (default the
        configured ``model.upscale.noise_level``) with noise from ``generator``."""
        self.check_inputs(inputs.given())
        assert inputs.image is not None
        noise_model = self._noise(model)
        cfg = noise_model.config
        self.check_low_res(inputs.image, latent_hw, cfg.factor)
        n = len(inputs.image)
        levels = inputs.noise_level
        if levels is None:
            levels = torch.full((n,), cfg.noise_level, dtype=torch.long)
        levels = levels.to(inputs.image.device, torch.long).reshape(-1).expand(n)
        return self.augment(model, inputs.image, levels, generator)

    def stand_in_inputs(self, images: Tensor, depth: Tensor | None = None) -> ConditioningInputs:
        """The plain bicubic low-res version of ``images`` (their factor is read off the sizes
        later; 4 here as every shipped upscaler), the images as the target."""
        return ConditioningInputs(image=downscale(images, 4), target=images)

    def pictures(self, inputs: ConditioningInputs) -> dict[str, Tensor]:
        assert inputs.image is not None
        return {"low-res": inputs.image}

    def grid_pictures(self, inputs: ConditioningInputs, results: Tensor) -> list[Tensor]:
        """low-res (nearest, at the output size) | upscaled | target (when known)."""
        assert inputs.image is not None
        low = F.interpolate(inputs.image.float(), size=results.shape[-2:], mode="nearest")
        rows = [low, results]
        return rows if inputs.target is None else [*rows, inputs.target]


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------

CONDITIONINGS: dict[str, ConditioningComponent] = {
    c.name: c for c in (TextToImage(), Inpainting(), Depth(), Upscale())
}


def conditioning_component(name: str) -> ConditioningComponent:
    """The component of ``model.conditioning`` ``name``."""
    try:
        return CONDITIONINGS[name]
    except KeyError:
        raise ConfigError(
            f"unknown conditioning {name!r}; choose from {', '.join(CONDITIONINGS)}",
            key="conditioning",
        ) from None


def extra_input_channels(conditioning: str, latent_channels: int) -> int:
    """Channels the ``conditioning`` mode concatenates to ``latent_channels`` noisy latents."""
    return conditioning_component(conditioning).extra_channels(latent_channels)


def required_data(conditioning: str, depth: DepthConfig | None = None) -> tuple[str, ...]:
    """The ``data.<section>.enabled`` switches that training a ``conditioning`` model needs
    (with ``depth.source: midas`` a depth model needs none)."""
    return conditioning_component(conditioning).required_data(depth or DepthConfig())


def _and(names: list[str]) -> str:
    return " and ".join(names)
