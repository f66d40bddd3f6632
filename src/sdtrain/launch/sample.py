"""``sdtrain sample``: text-to-image and inpainting from a run, a step checkpoint or an
original-layout file, with DDIM / PLMS and classifier-free guidance.

Where the weights come from:

- a run folder or ``step=NNNNNNNN.ckpt``: the config inside the checkpoint rebuilds the model as
  training did (see ``sdtrain.launch.export``), with the EMA UNet unless ``use_ema=False``;
- an original-layout ``.ckpt`` / ``.safetensors`` (released or exported): a model config must say
  what it is (``--config configs/models/sd15-inpainting.yaml``); a ``model_ema.*`` copy, when the
  file has one, is used unless ``use_ema=False``.

Inpainting follows the original ``scripts/inpaint``: the mask is binarised at 0.5 (white = repaint),
the masked image ``image * (mask < 0.5)`` in [-1, 1] is encoded to its posterior mode, and the mask
resized nearest to latent size plus those latents are the extra UNet channels. The picture written
is the decoded sample as a whole: the unmasked region is the model's (and the autoencoder's)
reconstruction of the input, not the input pasted back. ``keep_unmasked`` (``--keep-unmasked``)
also holds the latents of the fully unmasked latent cells to the input's during sampling, as the
original ``DDIMSampler``'s ``mask`` / ``x0`` arguments do (see ``KnownRegion``): the model then
generates only the masked region, consistently with what is kept.

Sampling is deterministic for a given seed on a given device: the start noise (and DDIM's noise
when ``eta > 0``) comes from one generator seeded with it.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from sdtrain.data.transforms import masked_images
from sdtrain.diffusion.samplers import KnownRegion, SamplerName, cfg_denoiser, sample
from sdtrain.diffusion.schedule import NoiseSchedule
from sdtrain.errors import ConfigError
from sdtrain.launch.export import (
    NotATrainingCheckpoint,
    TrainingCheckpoint,
    Weights,
    read_training_checkpoint,
    rebuild_model,
)
from sdtrain.models.checkpoint import (
    CheckpointError,
    OriginalCheckpoint,
    PathLike,
    read_checkpoint,
)
from sdtrain.models.config import ModelConfig
from sdtrain.models.stable_diffusion import StableDiffusion
from sdtrain.trainer.experiment import ExperimentConfig
from sdtrain.utils.images import image_grid, to_image, to_tensor

# ---------------------------------------------------------------------------------------------
# Where the model comes from
# ---------------------------------------------------------------------------------------------


@dataclass
class SamplingSource:
    """A checkpoint opened for sampling: its config is known before the model is built."""

    path: Path
    config: ExperimentConfig
    weights: Weights
    """Which UNet weights are used: the EMA or the raw ones."""
    global_step: int | None
    training: TrainingCheckpoint | None = None
    original: OriginalCheckpoint | None = None

    def build(self, device: torch.device | str = "cpu") -> StableDiffusion:
        """The model with the chosen weights, in eval mode, on ``device``."""
        if self.training is not None:
            model = rebuild_model(self.training, self.weights)
        else:
            assert self.original is not None
            model = _model_from_original(self.original, self.config.model, self.weights)
        return model.to(device).eval()


def open_source(
    src: PathLike, config: ExperimentConfig | None = None, use_ema: bool | None = None
) -> SamplingSource:
    """Open a run folder / step checkpoint (config inside) or an original-layout file
    (``config`` required). ``use_ema``: None = the EMA when there is one."""
    path = Path(src)
    try:
        training = read_training_checkpoint(path)
    except NotATrainingCheckpoint:
        training = None
    if training is not None:
        if config is not None:
            raise ConfigError(
                f"{training.path} is a training checkpoint that carries its own config; "
                "--config is only for original-layout files"
            )
        return SamplingSource(
            path=training.path,
            config=training.config,
            weights=training.pick(use_ema),
            global_step=training.global_step,
            training=training,
        )
    if config is None:
        raise ConfigError(
            f"{path} is an original-layout checkpoint: pass --config with its model config "
            "(e.g. --config configs/models/sd15-inpainting.yaml) so its architecture is known"
        )
    original = read_checkpoint(path)
    if use_ema and not original.ema:
        raise CheckpointError("holds no EMA weights (model_ema.*); sample with --no-ema", path)
    weights: Weights = "ema" if original.ema and use_ema is not False else "raw"
    return SamplingSource(path, config, weights, original.global_step, original=original)


def _model_from_original(
    ckpt: OriginalCheckpoint, cfg: ModelConfig, weights: Weights
) -> StableDiffusion:
    # Built on the meta device: every weight comes from the file, so random init would be waste.
    with torch.device("meta"):
        model = StableDiffusion(cfg)
    model.schedule = NoiseSchedule(cfg.diffusion)  # computed, not stored: build it for real
    if weights == "ema":
        ckpt = dataclasses.replace(ckpt, unet={**ckpt.unet, **ckpt.ema}, ema={})
    report = model.load_original(ckpt)
    if report.widened_from:
        raise ConfigError(
            f"{ckpt.path} holds a UNet with {report.widened_from} input channels but the "
            f"config {cfg.name!r} ({cfg.conditioning}) needs {cfg.unet.in_channels}: pass the "
            "model config that matches the file"
        )
    return model


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def check_inputs(cfg: ModelConfig, has_image: bool, has_mask: bool, size: int) -> None:
    """Usage errors before any heavy work: inputs the model needs or cannot use, the size."""
    if cfg.conditioning == "inpainting" and not (has_image and has_mask):
        raise ConfigError(
            f"{cfg.name} is an inpainting model: pass --image and --mask (white = repaint)"
        )
    if cfg.conditioning == "txt2img" and (has_image or has_mask):
        raise ConfigError(f"{cfg.name} is a text-to-image model: --image/--mask are not used")
    if cfg.conditioning == "depth":
        raise ConfigError(f"{cfg.name} is a depth model: sampling depth models is not supported")
    # Every UNet level halves the latents: the size must divide down to whole pixels.
    multiple = cfg.latent_downsampling * 2 ** (len(cfg.unet.channel_mult) - 1)
    if size <= 0 or size % multiple:
        raise ConfigError(f"--size {size} must be a positive multiple of {multiple} for {cfg.name}")


def load_image(path: PathLike, size: int) -> Tensor:
    """An image file -> (1, 3, size, size) in [-1, 1], centre-cropped square and resized."""
    with _open(path) as image:
        return to_tensor(image, size)


def load_mask(path: PathLike, size: int) -> Tensor:
    """A mask image -> (1, 1, size, size) in {0, 1}: 1 (white, >= 0.5) = repaint.

    Cropped like ``load_image`` and resized nearest, so the mask stays binary-edged.
    """
    with _open(path) as image:
        grey = image.convert("L")
    side = min(grey.size)
    left, top = (grey.width - side) // 2, (grey.height - side) // 2
    grey = grey.crop((left, top, left + side, top + side)).resize((size, size), Image.NEAREST)
    values = torch.from_numpy(np.asarray(grey).astype(np.float32) / 255.0)  # (S, S) in [0, 1]
    return (values >= 0.5).float()[None, None]


def _open(path: PathLike) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read image {path}: {err}") from None
    return image


def inpainting_channels(
    model: StableDiffusion, image: Tensor, mask: Tensor, latent_hw: tuple[int, int]
) -> Tensor:
    """The extra UNet channels: mask at latent size + latents of the masked image (mode)."""
    mask = (mask >= 0.5).to(image.dtype)  # (B, 1, H, W), 1 = repaint
    masked = masked_images(image, mask)  # image * (mask < 0.5), (B, 3, H, W) in [-1, 1]
    latents = model.encode_images(masked, sample=False)  # (B, 4, h, w)
    return model.conditioning_channels(latent_hw, mask=mask, masked_image_latents=latents)


def known_region(
    model: StableDiffusion, image: Tensor, mask: Tensor, latent_hw: tuple[int, int]
) -> KnownRegion:
    """The image's latents (mode) to keep in every latent cell whose pixels are all unmasked."""
    repaint = (mask >= 0.5).to(image.dtype)  # (B, 1, H, W)
    touched = nn.functional.adaptive_max_pool2d(repaint, latent_hw)  # (B, 1, h, w)
    return KnownRegion(model.encode_images(image, sample=False), 1 - touched)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_images(
    model: StableDiffusion,
    prompts: Sequence[str],
    *,
    negative_prompt: str = "",
    image: Tensor | None = None,
    mask: Tensor | None = None,
    sampler: SamplerName = "ddim",
    steps: int = 50,
    scale: float = 7.5,
    eta: float = 0.0,
    seed: int = 0,
    size: int = 512,
    keep_unmasked: bool = False,
) -> Tensor:
    """Images (B, 3, size, size) in [-1, 1], one per prompt, guided against ``negative_prompt``.

    Inpainting models need ``image`` (1 or B, 3, size, size) in [-1, 1] and ``mask`` (1 or B, 1,
    size, size), 1 = repaint; ``keep_unmasked`` holds the latent cells the mask does not touch to
    the image's own latents while sampling. The start noise is drawn from a generator seeded with
    ``seed``.
    """
    cfg = model.config
    check_inputs(cfg, image is not None, mask is not None, size)
    device = model.schedule.alphas_cumprod.device
    n, f = len(prompts), cfg.latent_downsampling
    latent_hw = (size // f, size // f)
    extra, known = None, None
    if image is not None and mask is not None:
        extra = inpainting_channels(model, image.to(device), mask.to(device), latent_hw)
        extra = extra.expand(n, -1, -1, -1)  # (B, 5, h, w)
        if keep_unmasked:
            known = known_region(model, image.to(device), mask.to(device), latent_hw)
    cond = model.text_encoder.encode(list(prompts))  # (B, 77, D)
    uncond = model.text_encoder.encode([negative_prompt] * n)  # (B, 77, D)
    guided = cfg_denoiser(model.unet, uncond, cond, scale, extra=extra)
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = (n, cfg.unet.out_channels, *latent_hw)
    latents = sample(
        model.schedule, guided, shape, sampler=sampler, steps=steps, eta=eta,
        generator=generator, device=device, known=known,
    )  # fmt: skip
    return model.decode_latents(latents)  # (B, 3, size, size)


@dataclass
class SampleResult:
    """What ``sample_to_file`` wrote."""

    path: Path
    images: Tensor
    """(B, 3, size, size) in [-1, 1]."""
    seed: int
    source: SamplingSource

    def summary(self) -> str:
        b, _, h, w = self.images.shape
        src = self.source
        grid = " in a grid" if b > 1 else ""
        step = f"step {src.global_step}, " if src.global_step is not None else ""
        return (
            f"wrote {self.path}: {b} image(s) of {w}x{h}{grid}, seed {self.seed}; "
            f"{src.config.model.name} from {src.path} ({step}{src.weights} weights)"
        )


def sample_to_file(
    checkpoint: PathLike,
    prompt: str,
    out: PathLike,
    *,
    config: ExperimentConfig | None = None,
    use_ema: bool | None = None,
    negative_prompt: str = "",
    image: PathLike | None = None,
    mask: PathLike | None = None,
    sampler: SamplerName = "ddim",
    steps: int = 50,
    scale: float = 7.5,
    eta: float = 0.0,
    seed: int | None = None,
    size: int | None = None,
    n: int = 1,
    device: str | None = None,
    keep_unmasked: bool = False,
) -> SampleResult:
    """Everything ``sdtrain sample`` does: open, check, build, sample, write the PNG.

    ``size`` defaults to the run's training image size (``data.image.size``; 512 for a bare
    model config); ``seed`` None draws one (reported in the result so it can be repeated).
    """
    if (image is None) != (mask is None):
        raise ConfigError("--image and --mask go together: pass both or neither")
    if n < 1:
        raise ConfigError(f"--n must be >= 1, got {n}")
    source = open_source(checkpoint, config, use_ema)
    size = size or source.config.data.image.size
    check_inputs(source.config.model, image is not None, mask is not None, size)
    seed = secrets.randbelow(2**31) if seed is None else seed
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pictures = {}
    if image is not None and mask is not None:
        pictures = {"image": load_image(image, size), "mask": load_mask(mask, size)}
    model = source.build(device)
    images = sample_images(
        model, [prompt] * n, negative_prompt=negative_prompt, sampler=sampler, steps=steps,
        scale=scale, eta=eta, seed=seed, size=size, keep_unmasked=keep_unmasked, **pictures,
    )  # fmt: skip
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    to_image(image_grid(images.cpu())).save(out, format="PNG")
    return SampleResult(out, images.cpu(), seed, source)
