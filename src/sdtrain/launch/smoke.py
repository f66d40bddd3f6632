"""``sdtrain smoke``: the whole model path once, end to end, on CPU in seconds.

Builds the configured model (randomly initialised unless weights are loaded later), encodes an
image with the autoencoder, noises its latents, runs the UNet once with the prompt's text features
(plus mask and masked-image latents for inpainting, a depth map for depth models), computes the
training loss and the model's x0 estimate, and writes the decoded images and the resolved config.
It proves the parts fit together; with random weights the pictures are not meant to be pretty.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from PIL import Image

from sdtrain.config.loader import to_yaml
from sdtrain.diffusion.loss import diffusion_loss, sample_noise
from sdtrain.models.conditioning import UNetConditioning
from sdtrain.models.stable_diffusion import StableDiffusion, build_stable_diffusion
from sdtrain.trainer.experiment import ExperimentConfig
from sdtrain.utils.images import draw_test_scene, to_image, to_tensor


def conditioning_for(
    model: StableDiffusion, image: torch.Tensor, latent_hw: tuple[int, int]
) -> tuple[UNetConditioning, dict[str, torch.Tensor]]:
    """The model's conditioning from stand-in inputs (a centre-box mask, brightness as depth;
    see ``ConditioningComponent.stand_in_inputs``) and the pictures worth saving."""
    component = model.conditioning
    inputs = component.stand_in_inputs(image)
    return component.from_inputs(model, inputs, latent_hw), component.pictures(inputs)


@torch.no_grad()
def run_smoke(
    cfg: ExperimentConfig,
    out_dir: Path,
    image_path: str | None = None,
    prompt: str = "a red circle above a blue square on a white background",
    size: int | None = None,
    timestep: int = 500,
) -> dict[str, float | str]:
    """Run the check, write ``out_dir/*.png``, ``config.yaml`` and ``smoke.json``; return stats."""
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_stable_diffusion(cfg.model).eval()
    f = cfg.model.latent_downsampling
    size = size or 8 * f  # 8x8 latents: enough for every level of the tiny UNets
    source = Image.open(image_path) if image_path else draw_test_scene(size)
    image = to_tensor(source, size)  # (1, 3, S, S)

    latents = model.encode_images(image, generator)  # (1, 4, S/f, S/f), scaled
    t = torch.tensor([timestep])
    noise = sample_noise(latents, cfg.model.diffusion.offset_noise, generator)
    noisy = model.schedule.q_sample(latents, t, noise)
    context = model.text_encoder.encode([prompt])  # (1, 77, D)
    cond, extra_images = conditioning_for(model, image, tuple(latents.shape[-2:]))
    prediction = model.unet(cond.unet_input(noisy), t, context, **cond.kwargs)  # (1, 4, h, w)
    target = model.schedule.target(latents, t, noise)
    loss = diffusion_loss(model.schedule, prediction, target, t)
    _, x0 = model.schedule.to_eps_and_x0(noisy, t, prediction)

    images = {
        "input": image,
        "reconstruction": model.decode_latents(latents),
        "noisy": model.decode_latents(noisy),
        "denoised": model.decode_latents(x0),
        **extra_images,
    }
    for name, tensor in images.items():
        to_image(tensor).save(out_dir / f"{name}.png")
    (out_dir / "config.yaml").write_text(to_yaml(cfg))
    stats: dict[str, float | str] = {
        "model": cfg.model.name,
        "conditioning": cfg.model.conditioning,
        "parameterization": cfg.model.diffusion.parameterization,
        "image_size": size,
        "latent_shape": "x".join(str(d) for d in latents.shape),
        "unet_parameters": sum(p.numel() for p in model.unet.parameters()),
        "timestep": timestep,
        "loss": float(loss),
        "reconstruction_mse": float((images["reconstruction"] - image).pow(2).mean()),
        "seconds": round(time.perf_counter() - started, 2),
    }
    (out_dir / "smoke.json").write_text(json.dumps(stats, indent=2) + "\n")
    width = max(len(k) for k in stats)
    print(f"sdtrain smoke: {cfg.model.name} end to end on {size}x{size} px")
    for key, value in stats.items():
        print(f"  {key:<{width}}  {value}")
    print(f"  wrote {', '.join(sorted(f'{n}.png' for n in images))}, config.yaml to {out_dir}")
    return stats
