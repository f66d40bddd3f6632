"""``sdtrain sample``: text-to-image and inpainting from a run, a step checkpoint, an
original-layout file or a diffusers folder, with DDIM / PLMS and classifier-free guidance.

Where the weights come from:

- a run folder or ``step=NNNNNNNN.ckpt``: the config inside the checkpoint rebuilds the model as
  training did (see ``sdtrain.launch.export``), with the EMA UNet unless ``use_ema=False``;
- an original-layout ``.ckpt`` / ``.safetensors`` (released or exported): a model config must say
  what it is (``--config configs/models/sd15-inpainting.yaml``); a ``model_ema.*`` copy, when the
  file has one, is used unless ``use_ema=False``;
- a diffusers folder (``model_index.json``): its own config files say what it is; ``--config``,
  when given, must agree with them (``models.adapters.diffusers``); ``unet_ema/`` is the EMA.

The sampling itself is ``sdtrain.models.sampling.sample_images`` (re-exported here), the one
that validation grids use too; this module opens the weights, reads the pictures, checks the
options and writes the PNG.

Inpainting (``models.conditioning.Inpainting``) follows the original ``scripts/inpaint``: the
mask is binarised at 0.5 (white = repaint), the masked image ``image * (mask < 0.5)`` in [-1, 1]
is encoded to its posterior mode, and the mask resized nearest to latent size plus those latents
are the extra UNet channels. The picture written
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
import math
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sdtrain.diffusion.samplers import SamplerName
from sdtrain.diffusion.schedule import NoiseSchedule
from sdtrain.errors import CheckpointError, ConfigError
from sdtrain.launch.export import (
    NotATrainingCheckpoint,
    TrainingCheckpoint,
    Weights,
    read_training_checkpoint,
    rebuild_model,
)
from sdtrain.models.adapters.diffusers import (
    EMA_FOLDER,
    is_diffusers_folder,
    read_diffusers,
    read_model_weights,
)
from sdtrain.models.adapters.original import OriginalCheckpoint, read_checkpoint
from sdtrain.models.conditioning import conditioning_component
from sdtrain.models.config import ModelConfig
from sdtrain.models.lora import apply_lora_file, merge_adapter
from sdtrain.models.sampling import check_size, sample_images
from sdtrain.models.stable_diffusion import StableDiffusion
from sdtrain.trainer.experiment import ExperimentConfig
from sdtrain.utils import files
from sdtrain.utils.files import PathLike
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
    if is_diffusers_folder(path):
        return _open_diffusers(path, config, use_ema)
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


def _open_diffusers(
    path: Path, config: ExperimentConfig | None, use_ema: bool | None
) -> SamplingSource:
    """A diffusers folder carries its model config; ``config`` (if given) must agree with it."""
    if config is not None:
        original = read_model_weights(path, config.model, same_objective=True)
    else:
        read = read_diffusers(path)
        original = read.checkpoint
        image = dataclasses.replace(ExperimentConfig().data.image, size=read.sample_size)
        config = ExperimentConfig(model=read.config)
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, image=image))
    if use_ema and not original.ema:
        raise CheckpointError(f"holds no EMA weights ({EMA_FOLDER}/); sample with --no-ema", path)
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


# The sampling inputs the command line gives (``ConditioningInputs`` fields), by flag.
CLI_INPUTS = {"image": "--image", "mask": "--mask"}
CLI_HINTS = {"mask": " (white = repaint)"}


def check_options(
    *, steps: int, scale: float, eta: float, sampler: str, n: int, seed: int | None,
    size: int | None,
) -> None:  # fmt: skip
    """The ranges of the numeric options, before anything is read: a ConfigError naming one."""
    if steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    if not (math.isfinite(scale) and scale >= 0):
        raise ConfigError(f"--scale must be a finite number >= 0, got {scale}")
    if not (math.isfinite(eta) and eta >= 0):
        raise ConfigError(f"--eta must be a finite number >= 0, got {eta}")
    if sampler == "plms" and eta != 0:
        raise ConfigError(f"--eta must be 0 with --sampler plms (it is deterministic), got {eta}")
    if n < 1:
        raise ConfigError(f"--n must be >= 1, got {n}")
    if seed is not None and not 0 <= seed < 2**64:
        raise ConfigError(f"--seed must be in [0, 2**64), got {seed}")
    if size is not None and size <= 0:
        raise ConfigError(f"--size must be > 0, got {size}")


def check_inputs(
    cfg: ModelConfig, has_image: bool, has_mask: bool, size: int, steps: int | None = None
) -> None:
    """Usage errors once the model is known, before any heavy work: inputs the model needs or
    cannot use, the size, the number of steps."""
    component = conditioning_component(cfg.conditioning)
    what = f"{cfg.name} is {component.article()} {component.description} model"
    given = {name for name, present in (("image", has_image), ("mask", has_mask)) if present}
    needs = set(component.sample_inputs)
    if needs - CLI_INPUTS.keys():
        raise ConfigError(f"{what}: sampling {component.description} models is not supported")
    missing = [name for name in component.sample_inputs if name not in given]
    if missing:
        flags = " and ".join(CLI_INPUTS[name] + CLI_HINTS.get(name, "") for name in missing)
        raise ConfigError(f"{what}: pass {flags}")
    unused = [name for name in CLI_INPUTS if name in given - needs - {*component.optional_inputs}]
    if unused:
        flags = "/".join(CLI_INPUTS[name] for name in unused)
        raise ConfigError(f"{what}: {flags} {'are' if len(unused) > 1 else 'is'} not used")
    check_size(cfg, size, "--size")
    if steps is not None and steps > cfg.diffusion.timesteps:
        raise ConfigError(
            f"--steps {steps} must be at most the model's {cfg.diffusion.timesteps} diffusion "
            "timesteps (model.diffusion.timesteps)"
        )


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


def load_low_res(path: PathLike, cfg: ModelConfig, size: int | None) -> Tensor:
    """An upscaler's low-res picture -> (1, 3, s, s) in [-1, 1] at its own (square-cropped)
    side; a ConfigError for one above ``model.upscale.max_input_size`` (tiling larger inputs is
    not supported) or a --size other than 4x it."""
    with _open(path) as image:
        side = min(image.size)
        up = cfg.upscale
        if side > up.max_input_size:
            raise ConfigError(
                f"{path} is {image.width}x{image.height}: an x4 upscaler input may be at most "
                f"{up.max_input_size} px (model.upscale.max_input_size); tiling larger inputs is "
                "not supported yet"
            )
        if size is not None and size != side * up.factor:
            raise ConfigError(
                f"--size {size} is not {up.factor}x the {side} px input; leave --size out"
            )
        return to_tensor(image, side)


def _open(path: PathLike) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read image {path}: {err}") from None
    return image


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
    lora: PathLike | None = None,
    lora_scale: float = 1.0,
    noise_level: int | None = None,
) -> SampleResult:
    """Everything ``sdtrain sample`` does: open, check, build, sample, write the PNG.

    ``size`` defaults to the run's training image size (``data.image.size``; 512 for a bare
    model config); ``seed`` None draws one (reported in the result so it can be repeated).
    ``lora`` (a kohya- or diffusers-layout file) is merged into the UNet at ``lora_scale``.
    An x4 upscaler takes ``image`` (the low-res picture, at its own size, which sets the output
    size: 4x) and ``noise_level`` (default ``model.upscale.noise_level``).
    """
    if not math.isfinite(lora_scale):
        raise ConfigError(f"--lora-scale must be a finite number, got {lora_scale}")
    if lora is None and lora_scale != 1.0:
        raise ConfigError("--lora-scale needs --lora FILE")
    check_options(steps=steps, scale=scale, eta=eta, sampler=sampler, n=n, seed=seed, size=size)
    problem = files.cannot_write(out)
    if problem:
        raise ConfigError(f"{problem}; choose another --out")
    source = open_source(checkpoint, config, use_ema)
    needs = conditioning_component(source.config.model.conditioning).sample_inputs
    upscaler = "image" in needs and "mask" not in needs  # the picture alone, setting the size
    if (image is None) != (mask is None) and not upscaler:
        raise ConfigError("--image and --mask go together: pass both or neither")
    if noise_level is not None and not upscaler:
        raise ConfigError("--noise-level is only for x4 upscaler models")
    low = load_low_res(image, source.config.model, size) if upscaler and image else None
    if low is not None:
        size = int(low.shape[-1]) * source.config.model.upscale.factor
    size = size if size is not None else source.config.data.image.size
    check_inputs(source.config.model, image is not None, mask is not None, size, steps)
    seed = secrets.randbelow(2**31) if seed is None else seed
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pictures = {}
    if image is not None and mask is not None:
        pictures = {"image": load_image(image, size), "mask": load_mask(mask, size)}
    if low is not None:
        pictures = {"image": low, "noise_level": noise_level}
    model = source.build(device)
    if lora is not None:
        merge_adapter(model.unet)  # a LoRA run's own adapter first, then the file's
        apply_lora_file(model.unet, str(lora), lora_scale)
    images = sample_images(
        model, [prompt] * n, negative_prompt=negative_prompt, sampler=sampler, steps=steps,
        scale=scale, eta=eta, seed=seed, size=size, keep_unmasked=keep_unmasked, **pictures,
    )  # fmt: skip
    out = Path(out)
    picture = to_image(image_grid(images.cpu()))
    files.write_atomic(out, lambda tmp: picture.save(tmp, format="PNG"))
    return SampleResult(out, images.cpu(), seed, source)
