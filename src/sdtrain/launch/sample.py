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

from sdtrain.data.transforms import ImageDecodeError, read_depth_map
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
from sdtrain.models.adapters.original import (
    OriginalCheckpoint,
    load_state_dict_strict,
    read_checkpoint,
)
from sdtrain.models.conditioning import conditioning_component
from sdtrain.models.config import ModelConfig
from sdtrain.models.lora import apply_lora_file, has_adapter, merge_adapter
from sdtrain.models.midas import MIDAS_CONFIGS, MiDaS, build_midas, read_midas_weights
from sdtrain.models.sampling import check_size, image_to_image, sample_images, size_multiple
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
    report = model.load_original(ckpt, parts=("unet", "vae", "text"))
    model.depth_estimator = _depth_estimator(ckpt, cfg)
    if report.widened_from:
        raise ConfigError(
            f"{ckpt.path} holds a UNet with {report.widened_from} input channels but the "
            f"config {cfg.name!r} ({cfg.conditioning}) needs {cfg.unet.in_channels}: pass the "
            "model config that matches the file"
        )
    return model


def _depth_weights(ckpt: OriginalCheckpoint, cfg: ModelConfig) -> tuple[dict[str, Tensor], str]:
    """The MiDaS weights for a file: its own ``depth_model.*``, else ``model.depth.weights``."""
    if ckpt.depth:
        return ckpt.depth, str(ckpt.path)
    if cfg.depth.weights:
        return read_midas_weights(cfg.depth.weights), cfg.depth.weights
    return {}, ""


def _depth_estimator(ckpt: OriginalCheckpoint, cfg: ModelConfig) -> MiDaS | None:
    """A depth model's frozen MiDaS, whatever ``model.depth.source`` says (sampling takes the
    depth from ``--image``), when the file or ``model.depth.weights`` has its weights."""
    midas = dataclasses.replace(cfg.depth, source="midas")
    name = conditioning_component(cfg.conditioning).frozen_estimator(midas)
    weights, where = _depth_weights(ckpt, cfg)
    if name is None or not weights:
        return None
    estimator = build_midas(name, device="meta")
    load_state_dict_strict(estimator, weights, source=where, what="MiDaS")
    return estimator


def _has_depth_estimator(source: SamplingSource) -> bool:
    """Whether the model ``source.build`` makes will hold a depth estimator."""
    cfg = source.config.model
    if source.training is not None:
        return conditioning_component(cfg.conditioning).frozen_estimator(cfg.depth) is not None
    assert source.original is not None
    return bool(source.original.depth) or bool(cfg.depth.weights)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


# The sampling inputs the command line gives (``ConditioningInputs`` fields), by flag.
CLI_INPUTS = {"image": "--image", "mask": "--mask", "depth": "--depth"}
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
    cfg: ModelConfig, has_image: bool, has_mask: bool, size: int, steps: int | None = None,
    has_depth: bool = False,
) -> None:  # fmt: skip
    """Usage errors once the model is known, before any heavy work: inputs the model needs or
    cannot use, the size, the number of steps. An image-to-image mode (depth) takes what it
    needs from ``--image``."""
    component = conditioning_component(cfg.conditioning)
    what = f"{cfg.name} is {component.article()} {component.description} model"
    present = (("image", has_image), ("mask", has_mask), ("depth", has_depth))
    given = {name for name, there in present if there}
    if component.image_to_image and has_image:
        given |= set(component.sample_inputs)
    needs = set(component.sample_inputs)
    if needs - CLI_INPUTS.keys():
        raise ConfigError(f"{what}: sampling {component.description} models is not supported")
    missing = [name for name in component.sample_inputs if name not in given]
    if missing:
        flags = " and ".join(CLI_INPUTS[name] + CLI_HINTS.get(name, "") for name in missing)
        alternative = " (or --image)" if component.image_to_image else ""
        raise ConfigError(f"{what}: pass {flags}{alternative}")
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


def load_image_padded(path: PathLike, multiple: int, min_side: int | None) -> Tensor:
    """As the depth2img scripts: the image at its own size, edge-padded on the right and bottom
    to a multiple of ``multiple`` (at least two of them) -> (1, 3, H', W') in [-1, 1]; a
    ConfigError naming the file for one under ``min_side`` px a side (the depth estimator's)."""
    with _open(path) as image:
        rgb = np.asarray(image.convert("RGB"))
    h, w = rgb.shape[:2]
    if min_side is not None and min(h, w) < min_side:
        raise ConfigError(
            f"{path} is {w}x{h} px: too small for the depth estimator (it needs at least "
            f"{min_side} px a side)"
        )
    pad_h, pad_w = (max(2, math.ceil(x / multiple)) * multiple - x for x in (h, w))
    rgb = np.pad(rgb, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def load_depth_map(path: PathLike, image: PathLike, padded: tuple[int, int]) -> Tensor:
    """A depth map (``.png`` 8/16-bit single channel, or ``.npy``) of ``image``'s own size ->
    (1, 1, H', W') in [-1, 1]: padded like the image, scaled as the scripts scale MiDaS depth
    (per map, ``2 (d - min) / (max - min) - 1``; larger = nearer)."""
    try:
        data = Path(path).read_bytes()
        depth = read_depth_map(data, Path(path).suffix)
    except (OSError, ImageDecodeError) as err:
        raise ConfigError(f"cannot read depth map {path}: {err}") from None
    with _open(image) as picture:
        w, h = picture.size
    if depth.shape != (h, w):
        dh, dw = depth.shape
        raise ConfigError(
            f"depth map {path} is {dw}x{dh} but --image {image} is {w}x{h}: pass a depth map "
            "of the image's size"
        )
    depth = np.pad(depth, ((0, padded[0] - h), (0, padded[1] - w)), mode="edge")
    low, high = float(depth.min()), float(depth.max())
    scaled = 2.0 * (depth - low) / (high - low) - 1.0 if high > low else np.zeros_like(depth)
    return torch.from_numpy(scaled.astype(np.float32))[None, None]


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
    depth: PathLike | None = None,
    strength: float | None = None,
) -> SampleResult:
    """Everything ``sdtrain sample`` does: open, check, build, sample, write the PNG.

    ``size`` defaults to the run's training image size (``data.image.size``; 512 for a bare
    model config); ``seed`` None draws one (reported in the result so it can be repeated).
    ``lora`` (a kohya- or diffusers-layout file) is merged into the UNet at ``lora_scale``, its
    text-encoder part (if any) into the text encoder.
    An x4 upscaler takes ``image`` (the low-res picture, at its own size, which sets the output
    size: 4x) and ``noise_level`` (default ``model.upscale.noise_level``). A depth model
    takes ``image`` for depth-to-image (``depth_to_image``): ``strength``, ``depth``.
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
    component = conditioning_component(source.config.model.conditioning)
    if component.image_to_image and image is not None:
        return depth_to_image(
            source, prompt, out, image=image, depth=depth, mask=mask, strength=strength,
            negative_prompt=negative_prompt, sampler=sampler, steps=steps, scale=scale,
            eta=eta, seed=seed, size=size, n=n, device=device, lora=lora,
            lora_scale=lora_scale, noise_level=noise_level,
        )  # fmt: skip
    if depth is not None or strength is not None:
        flag = "--depth" if depth is not None else "--strength"
        raise ConfigError(f"{flag} is for depth-to-image: a depth model and --image")
    needs = component.sample_inputs
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
    model = _build(source, device, lora, lora_scale)
    images = sample_images(
        model, [prompt] * n, negative_prompt=negative_prompt, sampler=sampler, steps=steps,
        scale=scale, eta=eta, seed=seed, size=size, keep_unmasked=keep_unmasked, **pictures,
    )  # fmt: skip
    return _write(out, images, seed, source)


def _build(
    source: SamplingSource, device: str, lora: PathLike | None, lora_scale: float
) -> StableDiffusion:
    model = source.build(device)
    if lora is not None:
        merge_adapter(model.unet)  # a LoRA run's own adapter first, then the file's
        if has_adapter(model.text_encoder):  # ... on the text encoder too
            merge_adapter(model.text_encoder)
        # a text-encoder part (lora_te_* / text_encoder.* keys) goes into the text encoder
        apply_lora_file(model.unet, str(lora), lora_scale, text_encoder=model.text_encoder)
    return model


def _write(out: PathLike, images: Tensor, seed: int, source: SamplingSource) -> SampleResult:
    out = Path(out)
    picture = to_image(image_grid(images.cpu()))
    files.write_atomic(out, lambda tmp: picture.save(tmp, format="PNG"))
    return SampleResult(out, images.cpu(), seed, source)


def depth_to_image(
    source: SamplingSource,
    prompt: str,
    out: PathLike,
    *,
    image: PathLike,
    depth: PathLike | None,
    mask: PathLike | None,
    strength: float | None,
    negative_prompt: str,
    sampler: SamplerName,
    steps: int,
    scale: float,
    eta: float,
    seed: int | None,
    size: int | None,
    n: int,
    device: str | None,
    lora: PathLike | None,
    lora_scale: float,
    noise_level: int | None,
) -> SampleResult:
    """The original depth2img script (``models.sampling.image_to_image``): ``image`` at its
    own size, padded to the UNet's size multiple; its depth from the model's MiDaS (the
    checkpoint's ``depth_model.*``, a run's estimator, or ``model.depth.weights``) unless
    ``depth`` (a depth map file of the image's size) is given; DDIM from ``strength``."""
    cfg = source.config.model
    strength = 0.8 if strength is None else strength
    if not (math.isfinite(strength) and 0.0 <= strength <= 1.0):
        raise ConfigError(f"--strength must be in [0, 1], got {strength}")
    unused = [flag for flag, value in (("--mask", mask), ("--size", size),
              ("--noise-level", noise_level)) if value is not None]  # fmt: skip
    if unused:
        raise ConfigError(f"depth-to-image keeps --image's size and takes no {'/'.join(unused)}")
    if sampler != "ddim":
        raise ConfigError("depth-to-image samples with DDIM (as the original script): "
                          "leave --sampler out")  # fmt: skip
    check_inputs(cfg, True, False, size_multiple(cfg), steps, has_depth=depth is not None)
    if depth is None and not _has_depth_estimator(source):
        hint = (
            "" if source.training is not None
            else ", or the MiDaS weights with model.depth.weights=dpt_hybrid-midas-501f0c75.pt"
        )  # fmt: skip
        raise ConfigError(
            f"{source.path} holds no depth estimator (no depth_model.* MiDaS weights): pass "
            f"--depth depth.png (a depth map of {image}){hint}"
        )
    min_side = None if depth is not None else MIDAS_CONFIGS[cfg.depth.estimator].multiple_of
    picture = load_image_padded(image, size_multiple(cfg), min_side)
    padded = (int(picture.shape[-2]), int(picture.shape[-1]))
    depth_map = None if depth is None else load_depth_map(depth, image, padded)
    seed = secrets.randbelow(2**31) if seed is None else seed
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = _build(source, device, lora, lora_scale)
    images = image_to_image(
        model, [prompt] * n, picture, strength=strength, depth=depth_map,
        negative_prompt=negative_prompt, steps=steps, scale=scale, eta=eta, seed=seed,
    )  # fmt: skip
    return _write(out, images, seed, source)
