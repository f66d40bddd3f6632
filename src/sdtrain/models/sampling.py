"""The one way images are sampled from a ``StableDiffusion``: validation grids, ``sdtrain sample``
and the demo all call ``sample_images``.

Per chunk of prompts: the text contexts (prompt and negative prompt), the conditioning of the
model's mode from the pixel-space inputs (``models.conditioning``), classifier-free guidance
(``cfg_denoiser``), DDIM / PLMS from the start noise, then the decoder. The start noise is
``noise`` when given (validation: the same every time) or drawn from a generator seeded with
``seed`` on the model's device, which also draws DDIM's noise when ``eta > 0`` and the
known-region noise of ``keep_unmasked``: a seed gives the same pictures every time on a device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sdtrain.diffusion.samplers import DDIMSampler, SamplerName, cfg_denoiser, sample
from sdtrain.errors import ConfigError
from sdtrain.models.conditioning import ConditioningInputs, conditioning_component
from sdtrain.models.config import ModelConfig
from sdtrain.models.stable_diffusion import StableDiffusion


def size_multiple(cfg: ModelConfig) -> int:
    """Image sides must be a multiple of this: every UNet level halves the latents."""
    return cfg.latent_downsampling * 2 ** (len(cfg.unet.channel_mult) - 1)


def check_size(cfg: ModelConfig, size: int, what: str = "size") -> None:
    """A ConfigError unless ``size`` divides down to whole latent pixels at every UNet level."""
    multiple = size_multiple(cfg)
    if size <= 0 or size % multiple:
        raise ConfigError(f"{what} {size} must be a positive multiple of {multiple} for {cfg.name}")


@torch.no_grad()
def sample_images(
    model: StableDiffusion,
    prompts: Sequence[str],
    *,
    negative_prompt: str = "",
    image: Tensor | None = None,
    mask: Tensor | None = None,
    depth: Tensor | None = None,
    noise_level: int | Tensor | None = None,
    sampler: SamplerName = "ddim",
    steps: int = 50,
    scale: float = 7.5,
    eta: float = 0.0,
    seed: int = 0,
    size: int = 512,
    noise: Tensor | None = None,
    chunk: int | None = None,
    keep_unmasked: bool = False,
) -> Tensor:
    """Images (B, 3, size, size) in [-1, 1], one per prompt, guided against ``negative_prompt``.

    The pixel-space inputs the model's conditioning needs (1 or B each, ``size`` x ``size``):
    inpainting ``image`` (3 channels, [-1, 1]) and ``mask`` (1 = repaint); depth ``depth``
    ([-1, 1]); x4 upscaler ``image`` (3 channels, [-1, 1], the output's 1/4 side: it sets
    the size) and its ``noise_level`` (default ``model.upscale.noise_level``).
    ``keep_unmasked`` holds the latent cells the mask does not touch to the image's own latents
    while sampling. ``noise`` (B, C, h, w) is the start noise (then ``size`` follows
    from it); ``chunk`` samples that many prompts at a time (default: all at once).
    """
    cfg = model.config
    component = conditioning_component(cfg.conditioning)
    if isinstance(noise_level, int):
        noise_level = torch.tensor([noise_level])
    inputs = ConditioningInputs(image=image, mask=mask, depth=depth, noise_level=noise_level)
    component.check_inputs(inputs.given(), cfg.name)
    fixed_hw = component.latent_size(inputs)
    if fixed_hw is not None and noise is None:
        latent_hw = fixed_hw
    elif noise is None:
        check_size(cfg, size)
        f = cfg.latent_downsampling
        latent_hw = (size // f, size // f)
    else:
        latent_hw = (int(noise.shape[-2]), int(noise.shape[-1]))
    device = model.schedule.alphas_cumprod.device
    inputs = inputs.to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    n = len(prompts)
    chunk = chunk or n
    out = []
    for start in range(0, n, chunk):
        part = slice(start, start + chunk)
        batch = list(prompts[part])
        selected = inputs.select(part)
        cond = component.from_inputs(model, selected, latent_hw, generator).expand(len(batch))
        uncond = component.unconditional(cond)
        known = component.known_region(model, selected, latent_hw) if keep_unmasked else None
        context = model.text_encoder.encode(batch)  # (b, 77, D)
        negative = model.text_encoder.encode([negative_prompt] * len(batch))  # (b, 77, D)
        guided = cfg_denoiser(
            model.unet, negative, context, scale,
            extra=cond.concat, kwargs=cond.kwargs,
            uncond_extra=uncond.concat, uncond_kwargs=uncond.kwargs,
        )  # fmt: skip
        x_T = None if noise is None else noise[part].to(device)  # (b, C, h, w)
        shape = (len(batch), cfg.unet.out_channels, *latent_hw)
        latents = sample(
            model.schedule, guided, shape, sampler=sampler, steps=steps, eta=eta,
            generator=generator, x_T=x_T, device=device, known=known,
        )  # fmt: skip
        out.append(model.decode_latents(latents).float())  # (b, 3, size, size)
    return torch.cat(out)


@torch.no_grad()
def image_to_image(
    model: StableDiffusion,
    prompts: Sequence[str],
    image: Tensor,
    *,
    strength: float = 0.8,
    depth: Tensor | None = None,
    negative_prompt: str = "",
    steps: int = 50,
    scale: float = 7.5,
    eta: float = 0.0,
    seed: int = 0,
) -> Tensor:
    """The original depth2img script: ``image`` (1, 3, H, W) in [-1, 1] repainted, one result
    (B, 3, H, W) per prompt.

    The conditioning comes from the image (a depth model: its MiDaS, or ``depth`` (1, 1, H, W)
    in [-1, 1] when given); the image's latents (a posterior sample) are noised to DDIM step
    ``t_enc = min(int(strength * steps), steps - 1)`` (pure noise at strength 1, as the
    script) and DDIM with classifier-free guidance denoises them from there. One generator
    seeded with ``seed`` draws, in order, the posterior sample, the encoding noise and DDIM's
    noise when ``eta > 0``.
    """
    cfg = model.config
    component = conditioning_component(cfg.conditioning)
    if not component.image_to_image:
        raise ConfigError(f"{cfg.name} is {component.article()} {component.description} model: "
                          "image-to-image is for depth models")  # fmt: skip
    if not 0.0 <= strength <= 1.0:
        raise ConfigError(f"--strength must be in [0, 1], got {strength}")
    device = model.schedule.alphas_cumprod.device
    n = len(prompts)
    f = cfg.latent_downsampling
    latent_hw = (int(image.shape[-2]) // f, int(image.shape[-1]) // f)
    inputs = ConditioningInputs(image=image, depth=depth).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    cond = component.from_inputs(model, inputs, latent_hw, generator).expand(n)
    uncond = component.unconditional(cond)
    latents = model.encode_images(inputs.image.expand(n, -1, -1, -1), generator)  # (B, C, h, w)
    run = DDIMSampler(model.schedule, steps, eta)
    t_enc = min(int(strength * steps), steps - 1)
    noise = torch.randn(latents.shape, generator=generator, device=device)
    x = noise if strength == 1.0 else run.encode(latents, t_enc, noise)
    context = model.text_encoder.encode(list(prompts))  # (B, 77, D)
    negative = model.text_encoder.encode([negative_prompt] * n)  # (B, 77, D)
    guided = cfg_denoiser(
        model.unet, negative, context, scale,
        extra=cond.concat, kwargs=cond.kwargs,
        uncond_extra=uncond.concat, uncond_kwargs=uncond.kwargs,
    )  # fmt: skip
    return model.decode_latents(run.decode(guided, x, t_enc, generator)).float()
